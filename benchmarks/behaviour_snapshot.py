"""Record (and compare) what the pipeline decides, to show a refactoring changed no behaviour.

Runs the real step functions of :mod:`stage1_core.pipeline` on synthetic features (no images,
no backbone; the layout of ``tests/unit/test_pipeline.py``) for phase 1 (softmax policy), phase 2,
phase 3 (gated head, gate policy) and phase 6 (SCRC-I, on a stand-in phase 4), then records per
phase: the policy certificate's figures (thresholds, coverage, bounds), the val_test decisions
(exit / label arrays and their digest), ``evaluation.json``'s figures, ``metrics.csv`` and every
criterion's verdict. Timestamps and lineage ids are left out (ids change where keys are renamed).

    python benchmarks/behaviour_snapshot.py record before.json [--bundles DIR]
    python benchmarks/behaviour_snapshot.py compare before.json after.json

``compare`` prints every differing figure and exits 1 if any differs; keys renamed since the
reference (:data:`RENAMED`) are compared under their new name.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Keys whose values hold times, run ids or lineage ids (never compared).
VOLATILE = {"created_at", "run_id", "dagster_run_id", "lineage_id", "id", "checkpoint_id", "code_version",
            "path", "written_at", "duration_s", "seconds"}


def plain(value: Any) -> Any:
    """JSON-ready copy of ``value`` without volatile keys."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def record(out: Path, bundles: Path | None) -> None:
    from stage1_core import pipeline
    from stage1_core.artifacts import read_json
    from stage1_core.config import Stage1ProConfig
    from stage1_core.phases import PHASES
    from tests.unit.test_pipeline import CONFIG, write_feature_phase

    PHASES[4] = dataclasses.replace(PHASES[3], phase=4, requires=(3,), available=True)
    PHASES[6] = dataclasses.replace(PHASES[6], available=True)
    snapshot: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Stage1ProConfig.from_dict({**CONFIG, "epochs": 12, "early_stop_patience": 12})
        partitions = ("phase1", "phase2", "phase3", "phase4", "phase6")
        layout = write_feature_phase(Path(tmp), config, np.random.default_rng(0), partitions)
        for partition in partitions:
            pipeline.train_phase(config, layout, partition)
            pipeline.predict_splits(config, layout, partition)
            pipeline.fit_exit_policy(config, layout, partition)
            pipeline.evaluate_phase(config, layout, partition)
            pipeline.export_phase_bundle(config, layout, partition, run_id="snapshot")
            policy_dir = layout.root / "exit_policy" / partition
            (policy_file,) = [p for p in policy_dir.glob("*.json") if p.name != "lineage.json"
                              and p.name.endswith(("thresholds.json", "gateparams.json", "scrcparams.json"))]
            decisions = torch.load(layout.root / "evaluation" / partition / "decisions.pt", weights_only=True)
            exit_, label = decisions["exit"].numpy(), decisions["label"].numpy()
            verdicts = {}
            for criterion in PHASES[int(partition[-1])].criteria:
                verdict = pipeline.evaluate_criterion(criterion.name, config, layout, partition)
                verdicts[criterion.name] = {"passed": verdict.passed, "figures": plain(verdict.figures)}
            snapshot[partition] = {
                "policy_file": policy_file.name,
                "certificate": plain(read_json(policy_file)),
                "decisions": {"n": int(len(exit_)), "n_exit": int(exit_.sum()),
                              "digest": hashlib.sha256(exit_.tobytes() + label.tobytes()).hexdigest(),
                              "p_roadwork_sum": float(decisions["p_roadwork"].double().sum())},
                "evaluation": plain(read_json(layout.root / "evaluation" / partition / "evaluation.json")),
                "metrics": plain(pipeline.read_metrics_csv(layout, partition)),
                "verdicts": verdicts,
            }
            if bundles is not None:
                target = bundles / partition
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(pipeline.bundle_dir(layout, partition), target)
                data = pipeline.load_split_features(layout, partition, "val_test")
                features = data.features if hasattr(data, "features") else data[0]
                torch.save({"features": torch.as_tensor(features)[:200].clone(),
                            "exit": torch.as_tensor(exit_[:200]), "label": torch.as_tensor(label[:200]),
                            "p_roadwork": decisions["p_roadwork"][:200].clone()}, target.parent / f"{partition}_val_test.pt")
    out.write_text(json.dumps(snapshot, indent=1, sort_keys=True))
    print(f"wrote {out}")


def diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'after' if key not in a else 'before'}")
            else:
                diff(a[key], b[key], f"{where}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} -> {b!r}")


#: Keys renamed since the reference snapshot (old -> new): compared under the new name.
RENAMED = {"fnr_target": "target_fnr_exit", "fnr_target_met": "target_fnr_exit_met"}


def renamed(value: Any) -> Any:
    if isinstance(value, dict):
        return {RENAMED.get(k, k): renamed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v) for v in value]
    return value


def compare(before: Path, after: Path) -> int:
    a, b = renamed(json.loads(before.read_text())), json.loads(after.read_text())
    problems: list[str] = []
    diff(a, b, "", problems)
    for partition in sorted(a):
        d = a[partition]["decisions"]
        same = partition in b and b[partition]["decisions"] == d
        print(f"{partition}: {a[partition]['policy_file']} val_test n={d['n']} exits={d['n_exit']} "
              f"decisions {'identical' if same else 'DIFFER'}; {len(a[partition]['verdicts'])} verdicts")
    print(f"{len(problems)} differing figures")
    for line in problems:
        print("  " + line)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--bundles", type=Path, default=None, help="copy each phase's bundle (+ val_test features) here")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.bundles)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
