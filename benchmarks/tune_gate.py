"""Tune the phase-3 gate's training knobs on val_select, never on val_test.

For each value of one config field, trains the gated head of phase 3 on the cached features of an
artifacts root where phase 1 ran (same data, same backbone, so the same feature store), certifies
the softmax and the raw-gate policies on val_calib exactly as the pipeline does, and reports, on
val_select and on val_calib, coverage, exit accuracy and FNR on exits of both policies:

    python benchmarks/tune_gate.py --artifacts artifacts --config configs/default.yaml \
        --field gate_risk_weight --values 0.3,1,2

``--field seed --values 1,2,3,4`` repeats one setting over training seeds (the figures move by a
point between seeds with ~800 samples per split). After the rows, a ``summary`` line gives per
split the mean and the worst value of gate minus softmax (coverage, exit accuracy; rows where a
policy exits nothing are counted as failures) and the lowest head accuracy.

(A strictly increasing calibration map leaves the certified exit set of the raw gate unchanged,
so the raw gate score stands for the calibrated one.)

Tuning never touches the embedded default's certified splits: the script refuses an artifacts
root whose data was generated with the default's ``synthetic_seed`` (its val_calib certifies the
default's policies and its val_test confirms them). Tune on other data seeds (1001-1003 by
convention; 2001-2005 to 6001-6005 are kept for ``benchmarks/bench_seeds.py``):

    STAGE1_ARTIFACTS=/tmp/tune1001 STAGE1_CONFIG=<default with synthetic_seed: 1001> make demo PHASE=phase1
    python benchmarks/tune_gate.py --artifacts /tmp/tune1001 --set synthetic_seed=1001 --field ... --values ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_synthetic_learnability import load_config, softmax, split_samples, train  # noqa: E402

from stage1_core.calibration.threshold_sweep import certify_score_threshold, certify_softmax_threshold  # noqa: E402
from stage1_core.features import TensorSplit, load_cached_features  # noqa: E402


def policy_figures(exits: np.ndarray, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    exited_positives = exits & (labels == 1)
    return {"coverage": round(float(exits.mean()), 4),
            "exit_accuracy": round(float((preds[exits] == labels[exits]).mean()), 4) if exits.any() else None,
            "fnr_on_exits": round(float((preds[exited_positives] == 0).mean()), 4) if exited_positives.any() else None}


def summarise(rows: list[dict]) -> dict[str, dict[str, float | int | None]]:
    """Per split: mean and worst gate-minus-softmax coverage and exit accuracy (points), lowest head accuracy."""
    out: dict[str, dict[str, float | int | None]] = {}
    for split in ("val_select", "val_calib"):
        cov, acc = [], []
        for row in rows:
            gate, soft = row[split]["gate"], row[split]["softmax"]
            cov.append(100 * (gate["coverage"] - soft["coverage"]))
            if gate["exit_accuracy"] is not None and soft["exit_accuracy"] is not None:
                acc.append(100 * (gate["exit_accuracy"] - soft["exit_accuracy"]))
        out[split] = {"runs": len(rows), "runs_with_exits": len(acc),
                      "coverage_gain_mean": round(float(np.mean(cov)), 2), "coverage_gain_worst": round(min(cov), 2),
                      "exit_accuracy_diff_mean": round(float(np.mean(acc)), 2) if acc else None,
                      "exit_accuracy_diff_worst": round(min(acc), 2) if acc else None,
                      "head_accuracy_min": min(row[split]["accuracy"] for row in rows)}
    return out


def refuse_default_data(artifacts: Path, default_config: Path = Path("configs/default.yaml")) -> None:
    """Exit when ``artifacts`` holds the embedded default's data set (its val_calib and val_test are certified splits)."""
    marker = artifacts / "data" / "synthetic" / "synthetic.json"
    if not marker.is_file():
        raise SystemExit(f"{marker} not found: tune on an artifacts root where phase 1 ran on generated data")
    seed = json.loads(marker.read_text())["params"]["seed"]
    from stage1_core.config import Stage1ProConfig

    default_seed = Stage1ProConfig.from_file(default_config).synthetic_seed
    if seed == default_seed:
        raise SystemExit(
            f"{artifacts} holds the embedded default's data (synthetic_seed {seed}): its val_calib and val_test "
            f"certify and confirm the default's policies and must not steer its knobs. Tune on another data seed "
            f"(e.g. synthetic_seed 1001, see this script's docstring)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="artifacts root where phase 1 ran")
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--field", required=True, help="config field to vary, e.g. gate_risk_weight")
    parser.add_argument("--values", required=True, help="comma-separated values (YAML)")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    parser.add_argument("--work", type=Path, default=Path("artifacts/tune_gate"))
    args = parser.parse_args()

    refuse_default_data(args.artifacts)
    pointer = json.loads((args.artifacts / "cached_features" / "phase1" / "cache.json").read_text())
    store = Path(pointer["store"])
    data_dir = args.artifacts / "data" / "synthetic"
    rows: list[dict] = []
    for raw in args.values.split(","):
        value = yaml.safe_load(raw)
        config = load_config(args.config, [f"{args.field}={raw}", *args.set], None)
        samples = split_samples(data_dir, config)
        labels = {n: torch.tensor([s.label for s in g]) for n, g in samples.items()}
        loaded = load_cached_features(store, splits=list(samples), labels=labels)
        features = {n: TensorSplit(loaded[n].features, loaded[n].labels, tuple(s.sample_id for s in samples[n]), n)
                    for n in samples}
        start = time.perf_counter()
        trained = train(config, "phase3", features, args.work / f"{args.field}_{raw}")
        calib = trained["outputs"]["val_calib"]
        y_calib = features["val_calib"].labels.numpy()
        p_calib = softmax(calib["logits"])
        soft = certify_softmax_threshold(p_calib, y_calib, config.target_fnr_exit, config.delta)
        gate = certify_score_threshold(calib["gate"].double().numpy(), p_calib.argmax(1), y_calib,
                                       config.target_fnr_exit, config.delta)
        row: dict = {args.field: value, "train_seconds": round(time.perf_counter() - start, 1)}
        for split in ("val_select", "val_calib"):
            out, y = trained["outputs"][split], features[split].labels.numpy()
            probs = softmax(out["logits"])
            preds = probs.argmax(1)
            soft_exits = probs.max(1) >= soft.exit_threshold if soft.exit_threshold is not None else np.zeros(len(y), bool)
            gate_exits = (out["gate"].double().numpy() >= gate.exit_threshold if gate.exit_threshold is not None
                          else np.zeros(len(y), bool))
            row[split] = {"accuracy": round(float((preds == y).mean()), 4),
                          "softmax": policy_figures(soft_exits, preds, y), "gate": policy_figures(gate_exits, preds, y)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"summary": summarise(rows)}), flush=True)


if __name__ == "__main__":
    main()
