"""``stage1 bundle export-miner``: the folder a StreetVision miner submits.

::

    OUT/
      model_card.json     the subnet's fields (model_name, description, version, submitted_by,
                          submission_time), validated by schemas/model_card.schema.json
      bundle/             the deploy bundle, copied and verified (same id as the source)
      stage1_client.py    the standard-library client (predict_p_roadwork)
      README.md           how to run the service next to the miner; what p_roadwork and exit mean
      backbone/           only with --with-backbone for a bundle that names an external backbone:
                          config.json + model.safetensors, fingerprint checked

A bundle that carries its adapted backbone (phases 4-6) carries it inside ``bundle/``. The folder
is assembled in a temporary sibling and renamed into place, so ``OUT`` is complete or absent.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from stage1_core.artifacts import ArtifactError, atomic_write_text, read_json, schema_errors, write_json
from stage1_core.bundle.load import MANIFEST_NAME, bundle_id, verify_bundle
from stage1_core.model.backbone import BUILTIN_PREFIX, BackboneError, DINOv3Backbone, resolve_backbone
from stage1_core.serving import client as client_module

__all__ = ["CLIENT_FILE", "MinerExportError", "export_miner", "model_card"]

CLIENT_FILE = "stage1_client.py"
#: The files of an external backbone copied with --with-backbone (safetensors only: loading runs no code).
BACKBONE_FILES = ("config.json", "model.safetensors")


class MinerExportError(ValueError):
    """The submission folder cannot be written; the message lists every reason."""


def model_card(model_name: str, version: str, submitted_by: str, description: str,
               submission_time: int | None = None) -> dict[str, Any]:
    """The subnet's ``model_card.json``; :class:`MinerExportError` lists every field that is wrong."""
    card = {
        "model_name": model_name,
        "description": description,
        "version": version,
        "submitted_by": submitted_by,
        "submission_time": int(time.time()) if submission_time is None else int(submission_time),
    }
    problems = schema_errors(card, "model_card")
    if problems:
        raise MinerExportError("model_card.json would not match model_card.schema.json:\n  " + "\n  ".join(problems))
    return card


def _copy_backbone(info: dict[str, Any], artifacts_root: str | Path | None, target: Path) -> str:
    """Copy the external backbone into ``target`` and check its fingerprint; return where it came from."""
    model_path = info["model_path"]
    try:
        source = resolve_backbone(model_path, artifacts_root or "artifacts")
    except BackboneError as exc:
        raise MinerExportError(f"--with-backbone: backbone {model_path!r} recorded in bundle.json: {exc}") from None
    missing = [name for name in BACKBONE_FILES if not (source / name).is_file()]
    if missing:
        raise MinerExportError(
            f"--with-backbone: {source} lacks {', '.join(missing)}; a submission carries safetensors weights only "
            f"(loading them runs no code): convert the checkpoint with save_pretrained(safe_serialization=True)"
        )
    target.mkdir()
    for name in BACKBONE_FILES:
        shutil.copyfile(source / name, target / name)
    try:
        found = DINOv3Backbone.load(target).fingerprint()
    except BackboneError as exc:
        raise MinerExportError(f"--with-backbone: the copy of {source} does not load: {exc}") from None
    if found != info["fingerprint"]:
        raise MinerExportError(
            f"--with-backbone: {source} has fingerprint {found}, but the bundle's head was trained on "
            f"{info['fingerprint']}: it is not the bundle's backbone"
        )
    return str(source)


def _readme(card: dict[str, Any], manifest: dict[str, Any], the_id: str, backbone_note: str, backbone_flag: str) -> str:
    headline = manifest.get("headline") or {}
    row = "| `backbone/` | the backbone's weights (config.json + model.safetensors) |\n" if backbone_flag else ""
    figures = ", ".join(f"{k} {v}" for k, v in headline.items() if isinstance(v, (int, float, str))) or "see bundle/README.md"
    return f"""# {card['model_name']} {card['version']}

StreetVision miner submission written by `stage1 bundle export-miner` (stage1-pro). Submitted by
`{card['submitted_by']}`.

| file | what it is |
|---|---|
| `model_card.json` | the subnet's model card (model_name, description, version, submitted_by, submission_time) |
| `bundle/` | the Stage-1 deploy bundle, id `{the_id}` (phase {manifest['phase']}, exit policy `{manifest['active_exit_policy']}`); `bundle/README.md` holds its certificate and figures |
| `stage1_client.py` | a client for the miner's process, Python standard library only |
{row}
Headline figures of the bundle: {figures}.

## Backbone

{backbone_note}

## Running the service next to the miner

The miner's environment pins transformers 4.45; the model needs a newer one, so it runs in its
own environment (Python >= 3.10, `pip install` this project) as a local HTTP service:

```
stage1 bundle verify bundle --id {the_id}
stage1 serve --bundle bundle --id {the_id}{backbone_flag} --host 127.0.0.1 --port 8000
```

`--id` pins the bundle: the service refuses any other. It listens on 127.0.0.1 only (its
`/reload` endpoint is not authenticated). `GET /health` names the bundle it serves,
`GET /metrics` is Prometheus text. A newer bundle is picked up only on request:
`curl -X POST localhost:8000/reload -d '{{"id": "<new id>"}}'` (or `kill -HUP` the service, which
reloads the same directory with the same pin); the old bundle answers until the new one is loaded.

In the miner's detector (copy `stage1_client.py` next to it):

```python
from stage1_client import predict_p_roadwork

def forward(image_b64: str) -> float:
    return predict_p_roadwork("http://127.0.0.1:8000", image_b64, timeout=5.0, fallback=0.5)
```

The subnet scores an exception or a missing answer (9 s limit) as 0. With `fallback=` the client
answers that value (and logs a warning) when the service is down, slow or answers something that
is not a probability; without it, it raises `ServiceUnavailable` so the caller can decide.
`fallback=0.5` means "no information"; see the client's docstring for the other choices.

## What the answer means

- `p_roadwork`: the model's probability that the image shows roadwork, a float in [0, 1]; this
  is what the miner answers the validator.
- `exit`: Stage 1's exit decision. `true`: the label (`label`, 1 = roadwork) is final, under the
  bundle's certified bound on the false-negative rate among exited images; `false`: the image is
  deferred to a slower Stage 2 (`prediction_set` [0, 1]). A miner without a Stage 2 still answers
  `p_roadwork`; the exit tells which answers are the certified ones.
"""


def export_miner(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    model_name: str,
    version: str,
    submitted_by: str,
    description: str | None = None,
    with_backbone: bool = False,
    artifacts_root: str | Path | None = None,
    expected_id: str | None = None,
    submission_time: int | None = None,
) -> Path:
    """Write the submission folder ``out_dir`` for the bundle at ``bundle_dir``; return ``out_dir``."""
    source, out = Path(bundle_dir), Path(out_dir)
    problems = verify_bundle(source, expected_id=expected_id)
    if problems:
        raise MinerExportError(f"{source}: refusing to export an invalid bundle:\n  " + "\n  ".join(problems))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinerExportError(f"{out}: already exists and is not an empty directory; choose a new OUT")
    try:
        manifest = read_json(source / MANIFEST_NAME, schema="bundle")
    except ArtifactError as exc:
        raise MinerExportError(str(exc)) from None
    the_id = bundle_id(source)
    backbone = manifest["backbone"]
    text = description or (
        f"Stage-1 roadwork classifier (stage1-pro phase {manifest['phase']}, exit policy "
        f"{manifest['active_exit_policy']}), bundle {the_id[:16]}"
    )
    card = model_card(model_name, version, submitted_by, text, submission_time)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(source, tmp / "bundle")
        copied = verify_bundle(tmp / "bundle", expected_id=the_id)
        if copied:
            raise MinerExportError(f"{source}: the copy does not verify (changed while copying?):\n  " + "\n  ".join(copied))
        shutil.copyfile(client_module.__file__, tmp / CLIENT_FILE)
        flag = ""
        if backbone.get("directory"):
            note = (f"The bundle carries its adapted backbone in `bundle/{backbone['directory']}/` (safetensors, "
                    f"fingerprint `{backbone['fingerprint']}`); `stage1 serve` loads it from there.")
        elif with_backbone:
            origin = _copy_backbone(backbone, artifacts_root, tmp / "backbone")
            flag = " --backbone backbone"
            note = (f"`backbone/` holds the backbone the head was trained on, copied from `{origin}` "
                    f"(`{backbone['model_path']}` in bundle.json), fingerprint `{backbone['fingerprint']}`. "
                    f"Its licence is the one of that model: check that you may redistribute it.")
        else:
            where = ("the embedded tiny backbone, rebuilt deterministically by `stage1 serve`"
                     if backbone["model_path"].startswith(BUILTIN_PREFIX) else "not included in this folder")
            note = (f"The bundle references an external backbone, `{backbone['model_path']}` ({where}), fingerprint "
                    f"`{backbone['fingerprint']}`. The service refuses any backbone with another fingerprint. Its "
                    f"licence is the user's business; `--with-backbone` copies its weights into the folder.")
        write_json(tmp / "model_card.json", card, schema="model_card")
        atomic_write_text(tmp / "README.md", _readme(card, manifest, the_id, note, flag))
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
