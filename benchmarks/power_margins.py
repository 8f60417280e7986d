"""Margins of the comparative criteria with 90% power for models of equal quality, from other seeds' data.

A non-inferiority criterion passes when the paired CI's lower end of the difference is above
-margin; for two models of equal quality that happens with probability Phi(margin / s - z), s the
standard error of the paired mean difference. This script measures s's ingredients on artifacts
roots that ran the default config on *other* data seeds (never the default's val_calib or
val_test): the share of val_test images on which consecutive phases disagree (correct / exited),
and the CI half-width of phase 3's gate-minus-softmax exit accuracy; and, on val_select (a split
that may be the default's own: it selects, it never certifies), the share of images on which each
phase's head and the accuracy baseline (the class-weighted logistic probe) disagree
(``baseline_margin``). It prints, per comparison, the margin that gives 90% power at the default's
split size, so margins are fixed before the default's own figures are looked at.

    python benchmarks/power_margins.py /tmp/seeds/seed_1001/artifacts [more roots] [--n-val-test 816]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import norm

from stage1_core.acceptance.compare import paired_compare
from stage1_core.artifacts import load_tensors
from stage1_core.config import Stage1ProConfig
from stage1_core.steps.context import Layout
from stage1_core.steps.training import load_prediction_outputs
from stage1_core.store import DECISIONS_FILE, EVALUATION_FILE, PREDICTIONS_FILE


def outcomes(layout: Layout, partition: str) -> dict[str, np.ndarray] | None:
    """Per-image ``correct`` and ``exit`` of a phase's evaluated decisions on val_test (None when absent)."""
    path = layout.path("evaluation", partition) / DECISIONS_FILE
    if not path.is_file():
        return None
    decisions = load_tensors(path)
    labels = load_prediction_outputs(layout, partition, "val_test")[2]
    return {"correct": (decisions["label"].numpy() == labels).astype(float), "exit": decisions["exit"].numpy().astype(float)}


def probe_disagreement(layout: Layout, partition: str) -> tuple[float, int] | None:
    """Share of val_select images on which the phase's head and the logistic probe disagree (and n).

    The probe is the gate's: seed and class weighting from the config the phase's checkpoint recorded.
    """
    from stage1_core.baselines import logistic_probe_predictions
    from stage1_core.steps.backbone import load_split_features

    config = layout.path("checkpoint", partition) / "config.json"
    if not (layout.path("predictions", partition) / PREDICTIONS_FILE).is_file() or not config.is_file():
        return None
    recorded = json.loads(config.read_text())
    probs, _, labels = load_prediction_outputs(layout, partition, "val_select")
    train_x, train_y = load_split_features(layout, partition, "train")
    x, _ = load_split_features(layout, partition, "val_select")
    probe = logistic_probe_predictions(train_x.numpy(), train_y.numpy(), x.numpy(), seed=recorded["seed"],
                                       class_weighting=recorded["class_weighting"])
    head_correct, probe_correct = probs.argmax(1) == labels, probe == labels
    return float(np.mean(head_correct != probe_correct)), int(labels.size)


def margin_for_power(disagreement: float, n: int, power: float = 0.9, confidence: float = 0.95) -> float:
    """The non-inferiority margin at which two equal models pass with ``power`` (normal approximation)."""
    z = norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power)
    return float(z * math.sqrt(disagreement / n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="artifacts roots of runs on other data seeds")
    parser.add_argument("--n-val-test", type=int, default=816, help="val_test size of the config the margins are for")
    parser.add_argument("--accuracy-margin", type=float, default=Stage1ProConfig().accuracy_margin)
    parser.add_argument("--coverage-margin", type=float, default=Stage1ProConfig().coverage_margin)
    args = parser.parse_args()
    rows = []
    for root in args.roots:
        layout = Layout(root)
        phases = {f"phase{k}": outcomes(layout, f"phase{k}") for k in range(1, 7)}
        for k in range(2, 7):
            # A phase is compared with the nearest earlier phase that ran (phase 6 with 4 when 5 was skipped).
            earlier = [j for j in range(k - 1, 0, -1) if phases[f"phase{j}"] is not None]
            current = phases[f"phase{k}"]
            if current is None or not earlier:
                continue
            previous, j = phases[f"phase{earlier[0]}"], earlier[0]
            for what, margin in (("correct", args.accuracy_margin), ("exit", args.coverage_margin)):
                d = float(np.mean(current[what] != previous[what]))
                comparison, _ = paired_compare(current[what], previous[what], margin=margin,
                                               direction="non-inferiority", n_resamples=1000, confidence=0.95, seed=0)
                rows.append({"root": str(root), "comparison": f"phase{k} vs phase{j}", "figure": what,
                             "n": int(current[what].size), "disagreement": round(d, 4),
                             "difference": round(comparison.difference, 4),
                             "ci": [round(v, 4) for v in comparison.ci], "margin": margin, "passes": comparison.passed,
                             "margin_90_at_n": round(margin_for_power(d, args.n_val_test), 4)})
        for k in range(1, 7):
            probe = probe_disagreement(layout, f"phase{k}")
            if probe is not None:
                d, n = probe
                rows.append({"root": str(root), "comparison": f"phase{k} head vs logistic probe (val_select)",
                             "figure": "baseline", "n": n, "disagreement": round(d, 4),
                             "margin_90_at_n": round(margin_for_power(d, args.n_val_test), 4)})
        evaluation = layout.path("evaluation", "phase3") / EVALUATION_FILE
        if evaluation.is_file():
            ci = json.loads(evaluation.read_text()).get("gate_comparison", {}).get("exit_accuracy_difference")
            if ci:
                se = (ci["ci_upper"] - ci["ci_lower"]) / (2 * norm.ppf(0.975))
                rows.append({"root": str(root), "comparison": "phase3 gate vs softmax", "figure": "exit_accuracy",
                             "n": None, "disagreement": None,
                             "margin_90_at_n": round(float((norm.ppf(0.975) + norm.ppf(0.9)) * se), 4)})
    for row in rows:
        print(json.dumps(row))
    for figure in ("correct", "exit", "exit_accuracy", "baseline"):
        margins = [r["margin_90_at_n"] for r in rows if r["figure"] == figure]
        if margins:
            print(f"{figure}: margin for 90% power, largest over comparisons and roots: {max(margins):.4f}")


if __name__ == "__main__":
    main()
