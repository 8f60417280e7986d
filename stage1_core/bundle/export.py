"""Export a deploy bundle: head weights, exactly one policy file, config, splits, metrics, README.

The bundle is assembled in a temporary sibling directory, sealed with ``bundle.json`` (sha256 of
every other file), verified with :func:`~stage1_core.bundle.load.verify_bundle`, and only then
renamed into place, so ``out_dir`` always holds either the previous bundle or the complete new one.
"""

from __future__ import annotations

import os
import re

import datetime as _dt
import io
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from stage1_core.artifacts import (
    ArtifactError,
    atomic_write_bytes,
    atomic_write_text,
    load_tensors,
    read_json,
    sha256_file,
    write_json,
)
from stage1_core.bundle.load import (
    MANIFEST_NAME,
    POLICY_FILE_NAMES,
    BundleError,
    phase_problems,
    state_dict_digest,
    verify_bundle,
)
from stage1_core.config import Stage1ProConfig, git_commit
from stage1_core.dirswap import publish_directory
from stage1_core.model.head import HeadStateError, Stage1Head, load_head_state_dict
from stage1_core.policies import load_policy, policy_class
from stage1_core.reporting.text import fmt

__all__ = ["MODEL_FILE", "BUNDLE_FILES", "code_version", "export_bundle", "render_readme"]

MODEL_FILE = "model_best.pth"
#: Fixed names of the non-policy files (as the bundle schema requires them).
BUNDLE_FILES = {"config": "config.json", "splits": "splits.json", "metrics": "metrics.csv", "readme": "README.md"}
DISTRIBUTION = "stage1-pro"


def code_version() -> str:
    """``stage1-pro <version>`` plus ``+git <commit>`` when the source tree is a git checkout."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = git_commit()
    return f"{DISTRIBUTION} {version}" + (f" +git {commit}" if commit else "")


def _plain_state_dict(path: Path, head_info: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The head weights at ``path`` checked against ``head_info`` and re-keyed canonically."""
    try:
        state = load_tensors(path)
    except ArtifactError as exc:
        raise BundleError([f"head weights: {exc}"]) from exc
    head = Stage1Head(int(head_info["hidden_size"]), float(head_info["dropout"]), bool(head_info["with_gate"]))
    try:
        load_head_state_dict(head, state, source=path)
    except HeadStateError as exc:
        raise BundleError([f"head weights: {exc}"]) from exc
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()}


def _check_extra_name(name: str, reserved: set[str]) -> str | None:
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or any(p in ("", ".") for p in name.split("/")):
        return f"extra file name {name!r} must be a relative path inside the bundle (no '..', not absolute)"
    if pure.name in POLICY_FILE_NAMES:
        return (
            f"extra file {name!r} is a policy file: a bundle holds exactly one policy file, the active "
            f"policy's; refusing to add a second"
        )
    if name in reserved:
        return f"extra file name {name!r} collides with a file the bundle already holds"
    return None


def render_readme(manifest: Mapping[str, Any], policy_doc: Mapping[str, Any]) -> str:
    """The bundle's README.md: contents, how to load it, what the policy means, headline figures."""
    backbone, head = manifest["backbone"], manifest["head"]
    files = manifest["files"]
    descriptions = {
        manifest["model_file"]: "head weights, a plain state_dict of tensors (load with torch.load(weights_only=True))",
        manifest["policy_file"]: f"the exit policy ({manifest['active_exit_policy']}), fit on val_calib only",
        files["config"]: "the run configuration",
        files["splits"]: "sample ids of train / val_select / val_calib / val_test",
        files["metrics"]: "evaluation on val_test: value, bootstrap mean/std/CI, n per metric",
        files["readme"]: "this file",
    }
    policy = policy_class(manifest["active_exit_policy"])
    descriptions.update(policy.companion_descriptions(policy_doc))
    served = "calibrators/served_probability.json" in manifest["sha256"]
    if served:
        descriptions["calibrators/served_probability.json"] = (
            "served-probability calibrator (logistic map of the head's logit margin at the deployment prior), "
            "fit on val_select")
    lines = [
        f"# Stage-1 roadwork classifier: deploy bundle (phase {manifest['phase']})",
        "",
        "A frozen DINOv3 backbone gives CLS features, a small head gives roadwork / no-roadwork "
        "probabilities, and the exit policy decides which images Stage 1 answers at once.",
        "",
        "## What is inside",
        "",
        "| file | what | sha256 |",
        "|---|---|---|",
        f"| `{MANIFEST_NAME}` | manifest: file list and checksums, backbone, policy, provenance | - |",
    ]
    for name in sorted({*manifest["sha256"], files["readme"]}):
        what = descriptions.get(name, "additional file")
        digest = manifest["sha256"].get(name) if name != files["readme"] else None
        lines.append(f"| `{name}` | {what} | " + (f"`{digest[:16]}...` |" if digest else "see bundle.json |"))
    lines += [
        "",
        (f"Backbone (included, adapted from `{backbone['model_path']}`): `{backbone['directory']}/`"
         if backbone.get("directory") else f"Backbone (not included): `{backbone['model_path']}`")
        + f", hidden size {backbone['hidden_size']}, fingerprint `{backbone['fingerprint']}`. "
        "Loading refuses a backbone with another fingerprint.",
        f"Preprocessing: `{backbone['transform']}`.",
        f"Head: hidden size {head['hidden_size']}, dropout {head['dropout']}, gate head: {fmt(head['with_gate'])}.",
        "",
        "## How to load",
        "",
        "```bash",
        "stage1 bundle verify <this directory>",
        "stage1 predict --bundle <this directory> image1.jpg image2.jpg [--json]",
        "```",
        "",
        "```python",
        "from stage1_core.bundle import Stage1Bundle",
        "",
        'bundle = Stage1Bundle.load("<this directory>", artifacts_root="<where builtin backbones live>")',
        'bundle.predict(["image1.jpg"])',
        '# [{"exit": True, "label": 1, "p_roadwork": 0.97, "prediction_set": [1]}]',
        "```",
        "",
        "Loading checks the manifest and policy schemas, the file set, every sha256, that no path "
        "leaves this directory and that the weights are plain tensors. `label` is set only for "
        "exited images; a deferred image has prediction set [0, 1].",
        *([
            "",
            "What a miner serves: `p_roadwork` of every image, exited or deferred - the head's probability "
            "recalibrated at the deployment prior (the validators' 50/50 labels), so the validator's "
            "round(p) is the best 0.5 cut. `exit` is a latency hint for the miner's own cascade: the FNR "
            "certificate holds for exited images drawn like the challenge pipeline's (one recorded draw per "
            "val_calib image); a 224 x 224 input reaches the backbone whole (only normalised).",
        ] if served else []),
        "",
        "## Exit policy",
        "",
        f"Active exit policy: **{policy.name}** (file `{policy.policy_file}`).",
        "",
        *policy.readme_section(policy_doc),
        "",
        "## Headline figures",
        "",
    ]
    if manifest["headline"]:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in manifest["headline"].items()]
    else:
        lines.append("No headline figures were recorded; see metrics.csv.")
    lines += [
        "",
        "## Provenance",
        "",
        f"- created: {manifest['created_at']}",
        f"- code: {manifest['code_version']}",
        f"- Dagster run: {manifest['dagster_run_id'] or 'none (exported outside Dagster)'}",
        "",
    ]
    return "\n".join(lines)


def export_bundle(
    out_dir: str | Path,
    *,
    phase: int,
    head_state_dict_path: str | Path,
    policy_name: str,
    policy_file_path: str | Path,
    config: Stage1ProConfig,
    splits_path: str | Path,
    metrics_csv_path: str | Path,
    backbone_info: Mapping[str, Any],
    head_info: Mapping[str, Any],
    headline: Mapping[str, Any],
    dagster_run_id: str | None = None,
    extra_files: Mapping[str, str | Path] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Write a verified deploy bundle to ``out_dir`` atomically and return its path.

    ``backbone_info``: ``model_path``, ``fingerprint``, ``hidden_size``, ``transform``
    (``describe_transform`` of the evaluation transform) and optionally ``adapter_file``.
    ``head_info``: ``hidden_size``, ``dropout``, ``with_gate``. ``extra_files`` maps names inside
    the bundle (e.g. ``calibrators/platt.json``) to source files. Raises :class:`BundleError`
    listing every problem; ``out_dir`` is left untouched then.
    """
    out_dir = Path(out_dir)
    extra = dict(extra_files or {})
    if out_dir.exists() or out_dir.is_symlink():
        swapped = out_dir.is_symlink() and re.fullmatch(rf"\.{re.escape(out_dir.name)}\.v-[0-9a-f]{{32}}", os.readlink(out_dir))
        if (out_dir.is_symlink() and not swapped) or not out_dir.is_dir():
            raise BundleError([f"{out_dir} exists and is not a directory; refusing to replace it"])
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise BundleError(
                [f"{out_dir} is a non-empty directory without {MANIFEST_NAME} (not a bundle); refusing to replace it"]
            )
    try:
        policy_file = policy_class(policy_name).policy_file
    except ValueError as exc:
        raise BundleError([str(exc)]) from exc
    problems = [
        f"{label} lacks {key!r}"
        for label, info, keys in (
            ("backbone_info", backbone_info, ("model_path", "fingerprint", "hidden_size", "transform")),
            ("head_info", head_info, ("hidden_size", "dropout", "with_gate")),
        )
        for key in keys
        if key not in info
    ]
    problems += phase_problems(phase, policy_name, config.phase)
    reserved = {MANIFEST_NAME, MODEL_FILE, policy_file, *BUNDLE_FILES.values()}
    problems += [p for name in extra if (p := _check_extra_name(name, reserved))]
    problems += [f"extra file {name!r}: source {src} is not a file" for name, src in extra.items() if not Path(src).is_file()]
    for label, src in (("splits", splits_path), ("metrics", metrics_csv_path), ("head weights", head_state_dict_path)):
        if not Path(src).is_file():
            problems.append(f"{label}: {src} is not a file")
    if problems:
        raise BundleError(problems)
    try:
        policy = load_policy(policy_name, policy_file_path)
        policy_doc = read_json(policy_file_path)
        read_json(splits_path, schema="splits")
    except (ArtifactError, ValueError, TypeError) as exc:
        raise BundleError([str(exc)]) from exc
    for name, src in policy.companion_files().items():  # e.g. SCRC-T's val_calib outputs, beside the policy file
        if name in extra or name in reserved:
            raise BundleError([f"the policy's companion file {name!r} collides with another bundle file"])
        extra[name] = src
    state = _plain_state_dict(Path(head_state_dict_path), head_info)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(tmp / MODEL_FILE, buffer.getvalue())
        shutil.copyfile(policy_file_path, tmp / policy_file)
        config.save(tmp / BUNDLE_FILES["config"])
        shutil.copyfile(splits_path, tmp / BUNDLE_FILES["splits"])
        shutil.copyfile(metrics_csv_path, tmp / BUNDLE_FILES["metrics"])
        for name, src in extra.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)

        backbone = {
            "model_path": str(backbone_info["model_path"]),
            "fingerprint": str(backbone_info["fingerprint"]),
            "hidden_size": int(backbone_info["hidden_size"]),
            "transform": str(backbone_info["transform"]),
        }
        if backbone_info.get("adapter_file") is not None:
            backbone["adapter_file"] = str(backbone_info["adapter_file"])
        if backbone_info.get("directory") is not None:
            backbone["directory"] = str(backbone_info["directory"])
        manifest: dict[str, Any] = {
            "schema_version": 1,
            "phase": int(phase),
            "active_exit_policy": policy_name,
            "policy_file": policy_file,
            "model_file": MODEL_FILE,
            "backbone": backbone,
            "head": {
                "hidden_size": int(head_info["hidden_size"]),
                "dropout": float(head_info["dropout"]),
                "with_gate": bool(head_info["with_gate"]),
            },
            "files": dict(BUNDLE_FILES),
            "sha256": {},
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "code_version": code_version(),
            "dagster_run_id": dagster_run_id,
            "headline": dict(headline),
        }
        if lineage is not None:
            manifest["lineage"] = {**dict(lineage), "head_digest": state_dict_digest(state)}
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest["sha256"] = {name: sha256_file(tmp / name) for name in files}
        atomic_write_text(tmp / BUNDLE_FILES["readme"], render_readme(manifest, policy_doc))
        manifest["sha256"][BUNDLE_FILES["readme"]] = sha256_file(tmp / BUNDLE_FILES["readme"])
        manifest["sha256"] = dict(sorted(manifest["sha256"].items()))
        try:
            write_json(tmp / MANIFEST_NAME, manifest, schema="bundle")
        except ArtifactError as exc:
            raise BundleError([str(exc)]) from exc
        problems = verify_bundle(tmp)
        if problems:
            raise BundleError(problems, tmp)
        publish_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
