"""Crash safety: SIGKILL ``dagster asset materialize`` inside every writing step, then re-run.

Each kill point is a ``STAGE1_FAULT_INJECT`` spec (see :mod:`stage1_core.artifacts`): the writing
step kills its whole process group - the CLI that runs the steps (and, with the multiprocess
executor, the forkserver and the step's process) - at that point of that write, as ``kill -9`` of
the run would. After every kill an audit checks that

* no file under a final name is partial: every JSON, tensor, CSV and PNG under the artifacts
  root parses (temporary files and staging directories start with a dot and are never read);
* every asset whose ``lineage.json`` matches its files is loadable, and every asset whose files
  changed under it is refused by the pipeline's own input check (``StepContext.require``) with a
  message naming the file - never read as valid;
* the feature store either loads with verified checksums or is refused (``FeatureCacheError``);
* the published bundle (``bundle/phase1/bundle``) verifies: the previous one, or the new one
  once the kill came after its atomic link swap.

A "corrupt read" is any file that fails to parse under a final name, any asset that verifies but
does not load, and any damaged asset the input check accepts; it must stay 0. The final re-run
(``checkpoint*``) must complete and leave every asset verified and the bundle current. The
crash also leaves the killed run STARTED holding the ``gpu`` pool slot; the next run frees it
(:mod:`stage1_assets.recovery`) - otherwise the re-run would wait for ever.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stage1_core.config import Stage1ProConfig
from tests.integration.conftest import BIN, Project, clone_project, output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

PARTITION = "phase1"


@dataclass
class Audit:
    """What one audit of the artifacts root found."""

    files_parsed: int = 0
    verified: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    bundle_id: str | None = None


def materialize(project: Project, select: str, fault: str | None = None, extra_env: dict | None = None,
                timeout: int = 1800) -> subprocess.CompletedProcess:
    """``dagster asset materialize`` in its own process group, optionally with a kill point."""
    env = dict(project.env, **(extra_env or {}))
    env.pop("STAGE1_FAULT_INJECT", None)
    if fault is not None:
        env["STAGE1_FAULT_INJECT"] = f"{fault}:group"
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "stage1_assets.definitions", "--select", select,
            "--partition", PARTITION]
    proc = subprocess.Popen(args, cwd=project.home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _parses(path: Path) -> str | None:
    """None when ``path`` parses as what its name says, else why not."""
    from PIL import Image

    from stage1_core.artifacts import load_tensors

    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".pt", ".pth"):
            load_tensors(path)
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            if not rows or len({len(r) for r in rows}) != 1:
                return "empty or ragged CSV"
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        else:
            return None
    except Exception as exc:  # noqa: BLE001 - any failure to parse is what we count
        return f"{type(exc).__name__}: {exc}"
    return None


def audit(project: Project, damaged: frozenset[Path] = frozenset()) -> Audit:
    """Check the artifacts root as described in the module docstring; ``damaged`` were broken on purpose."""
    import torch

    from stage1_core.bundle.load import bundle_id, verify_bundle
    from stage1_core.config import Stage1ProConfig
    from stage1_core.features import MANIFEST_NAME, FeatureCacheError, load_cached_features, read_manifest
    from stage1_core.lineage import RECORD_FILE, StaleInputError, file_problems, read_record
    from stage1_core.steps.context import Layout, StepContext

    found = Audit()
    root = project.artifacts
    skip_top = {"data", "backbones"}  # inputs and Hugging Face weights, not written by the steps
    for directory, subdirs, files in os.walk(root):
        rel = Path(directory).relative_to(root)
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and not (rel == Path(".") and d in skip_top)]
        for name in files:
            path = Path(directory) / name
            if name.startswith(".") or path in damaged:
                continue
            problem = _parses(path)
            found.files_parsed += 1
            if problem is not None:
                found.corrupt.append(f"{path}: partial or unreadable under its final name ({problem})")

    config = Stage1ProConfig.from_file(project.config_path)
    layout = Layout(root)
    for record_file in sorted(root.rglob(RECORD_FILE)):
        if any(part.startswith(".") for part in record_file.relative_to(root).parts):
            continue
        rel = record_file.parent.relative_to(root).parts
        asset, partition = rel[0], (rel[1] if len(rel) > 1 else None)
        record = read_record(record_file.parent, asset, partition)
        problems = file_problems(record)
        if not problems:
            found.verified.append(record.name)
            continue
        found.refused.append(record.name)
        ctx = StepContext(config, layout, PARTITION)
        try:
            ctx.require("audit", [(asset, partition)])
        except StaleInputError as exc:
            if not any(Path(p.split(": ", 1)[1].split(" ")[0]).name in str(exc) for p in problems):
                found.corrupt.append(f"{record.name}: refused without naming the damaged file: {exc}")
        else:
            found.corrupt.append(f"{record.name}: files changed ({problems}) but the input check accepted it")

    for manifest in sorted((root / "feature_store").glob(f"*/{MANIFEST_NAME}")):
        store = manifest.parent
        try:
            splits = read_manifest(store).splits
            labels = {name: torch.zeros(entry["num_samples"], dtype=torch.long) for name, entry in splits.items()}
            load_cached_features(store, labels=labels)
            found.verified.append(f"feature_store/{store.name}")
        except FeatureCacheError:
            found.refused.append(f"feature_store/{store.name}")
        except Exception as exc:  # noqa: BLE001 - anything but a clean refusal is a corrupt read
            found.corrupt.append(f"feature store {store}: {type(exc).__name__}: {exc}")

    link = root / "bundle" / PARTITION / "bundle"
    problems = verify_bundle(link)
    if problems:
        found.corrupt.append(f"published bundle {link} does not verify: {problems}")
    else:
        found.bundle_id = bundle_id(link)
        found.verified.append("published bundle")
    return found


#: (what the kill interrupts, the selection run, the STAGE1_FAULT_INJECT spec), in this order: each
#: kill leaves the outputs as the crash left them and the next one runs on top. Steps whose kill
#: may leave their lineage stale (evaluation, checkpoint) come after the steps that read them.
KILL_POINTS = [
    ("feature cache: half of val_test_features.pt written", "cached_features",
     "*/feature_store/*/val_test_features.pt:mid-write"),
    ("feature cache: features written, manifest not renamed", "cached_features",
     "*/feature_store/*/manifest.json:before-rename:2"),
    ("predictions: predictions.pt written, not renamed", "predictions",
     "*/predictions/phase1/predictions.pt:before-rename"),
    ("exit policy: half of thresholds.json written", "exit_policy",
     "*/exit_policy/phase1/thresholds.json:mid-write"),
    ("bundle: half of the staged model_best.pth", "bundle",
     "*/bundle/phase1/versions/.*/model_best.pth:mid-write"),
    ("bundle: version directory renamed, link not swapped", "bundle",
     "*/bundle/phase1/versions/[0-9a-f]*:after-rename"),
    ("bundle: link swapped, lineage not written", "bundle",
     "*/bundle/phase1/bundle:after-rename"),
    ("evaluation: outputs written, half of lineage.json", "evaluation",
     "*/evaluation/phase1/lineage.json:mid-write"),
    ("checkpoint: half of the first model_best.pth", "checkpoint",
     "*/checkpoint/phase1/model_best.pth:mid-write"),
]


def _flip(path: Path) -> bytes:
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    return data


def test_kill_inside_every_writing_step_then_rerun(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path)
    started = time.monotonic()
    report: list[str] = []

    # The clone's cache pointer names the original project's store: point it at the clone's own.
    moved = materialize(project, "cached_features")
    assert moved.returncode == 0, output(moved)
    pointer = json.loads((project.artifacts / "cached_features" / PARTITION / "cache.json").read_text())
    store = Path(pointer["store"])
    assert store.is_relative_to(project.artifacts) and pointer["reused"], pointer
    before = audit(project)
    assert before.corrupt == [] and before.refused == [], before
    published = {before.bundle_id}

    # Damage on disk is detected by checksum and refused with the file named, never loaded ...
    checkpoint = project.artifacts / "checkpoint" / PARTITION / "model_best.pth"
    original = _flip(checkpoint)
    refused = materialize(project, "predictions")
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and f"{checkpoint} changed since it was written (checksum mismatch)" in text, \
        output(refused)
    checkpoint.write_bytes(original)
    features_file = store / "val_test_features.pt"
    _flip(features_file)
    refused = materialize(project, "evaluation")
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and f"{features_file} is corrupt or changed since extraction" in text, output(refused)
    report.append("damaged checkpoint and feature file: both refused, file named")
    damaged = frozenset({features_file})

    # ... and every kill point leaves no partial file readable and the published bundle intact.
    tried = 0
    for name, select, fault in KILL_POINTS:
        killed = materialize(project, select, fault=fault)
        assert killed.returncode == -signal.SIGKILL, f"kill point not reached: {name}\n{output(killed)}"
        tried += 1
        found = audit(project, damaged)
        assert found.corrupt == [], (name, found.corrupt)
        assert found.bundle_id is not None, name
        if found.bundle_id not in published:
            assert "link swapped" in name, f"{name}: the published bundle changed before its link swap"
            published.add(found.bundle_id)
        report.append(f"{name}: {len(found.verified)} verified, refused {found.refused}, corrupt 0, "
                      f"{found.files_parsed} files parsed")
        if select == "cached_features" and "manifest" in name:
            # The damaged features are recomputed, not loaded: only val_test, once the crash is behind us.
            rerun = materialize(project, "cached_features")
            assert rerun.returncode == 0, output(rerun)
            pointer = json.loads((project.artifacts / "cached_features" / PARTITION / "cache.json").read_text())
            batch = Stage1ProConfig.from_file(project.config_path).max_batch_size
            assert pointer["reused"] is False, pointer
            assert pointer["forward_passes"] == -(-pointer["n_val_test"] // batch), "only val_test is recomputed"
            damaged = frozenset()

    final = materialize(project, "checkpoint*")
    assert final.returncode == 0, output(final)
    after = audit(project)
    assert after.corrupt == [] and after.refused == [], after
    assert after.bundle_id not in published, "the re-run publishes a new bundle"
    summary = project.stage1("summary", "--phase", PARTITION)
    assert summary.returncode == 0 and after.bundle_id in summary.stdout, output(summary)
    report.append(f"re-run checkpoint*: completed; {len(after.verified)} verified, 0 refused, 0 corrupt")
    report.append(f"kill points tried: {tried}; wall time {time.monotonic() - started:.0f} s")
    print("\n".join(report))
