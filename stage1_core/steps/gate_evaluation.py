"""Phase-3+ evaluation extras: the gate policy next to the softmax policy on the same checkpoint.

On val_test only: coverage, exit accuracy and FNR on exits of both certified policies, paired
bootstrap CIs of the coverage and exit-accuracy differences, and the gate calibration (ECE and Brier of the raw
sigmoid vs the calibrated score for the calibrator's event), with the figures a person compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stage1_core.metrics.exit import exit_metrics


def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n] multinomial counts of a paired bootstrap (the same draws for a given seed)."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)


def paired_bootstrap_difference(a: np.ndarray, b: np.ndarray, n_resamples: int, confidence: float, seed: int) -> dict[str, float]:
    """Percentile CI of mean(a) - mean(b) over paired resamples (multinomial counts, vectorised)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n = a.shape[0]
    diffs = _resample_counts(n, n_resamples, seed) @ (a - b) / n
    alpha = (1.0 - confidence) / 2.0
    return {"difference": float(a.mean() - b.mean()), "ci_lower": float(np.quantile(diffs, alpha)),
            "ci_upper": float(np.quantile(diffs, 1.0 - alpha)), "n_resamples": int(n_resamples)}


def paired_bootstrap_exit_accuracy_difference(
    correct: np.ndarray, exits_a: np.ndarray, exits_b: np.ndarray, n_resamples: int, confidence: float, seed: int,
) -> dict[str, float]:
    """Percentile CI of exit accuracy(a) - exit accuracy(b) over paired resamples of the images.

    ``correct`` [N] says whether the class head is right; ``exits_a`` / ``exits_b`` [N] are the exit
    masks of two policies on the same images. Resamples in which a policy exits nothing are dropped
    (their exit accuracy is undefined) and counted.
    """
    correct = np.asarray(correct, dtype=float)
    a, b = np.asarray(exits_a, dtype=float), np.asarray(exits_b, dtype=float)
    counts = _resample_counts(correct.shape[0], n_resamples, seed).astype(float)
    exits = np.stack([counts @ a, counts @ b])
    right = np.stack([counts @ (a * correct), counts @ (b * correct)])
    defined = (exits > 0).all(0)
    diffs = right[0, defined] / exits[0, defined] - right[1, defined] / exits[1, defined]
    alpha = (1.0 - confidence) / 2.0
    point = float((a * correct).sum() / a.sum() - (b * correct).sum() / b.sum()) if a.sum() and b.sum() else float("nan")
    return {"difference": point, "ci_lower": float(np.quantile(diffs, alpha)) if diffs.size else float("nan"),
            "ci_upper": float(np.quantile(diffs, 1.0 - alpha)) if diffs.size else float("nan"),
            "n_resamples": int(n_resamples), "undefined_resamples": int((~defined).sum())}


def _brier(scores: np.ndarray, events: np.ndarray) -> float:
    return float(np.mean((scores - events) ** 2))


def _exit_summary(exits: np.ndarray, preds: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    em = exit_metrics(exits, preds, labels)
    return {"coverage": float(em.coverage), "exit_accuracy": em.exit_accuracy, "fnr_on_exited": em.fnr_on_exited,
            "n_exited_positives": int(em.n_exited_positives), "n_false_negatives": int(em.n_false_negatives)}


def gate_comparison(
    policy_doc: dict[str, Any],
    probs: np.ndarray,
    raw_gate: np.ndarray,
    gate_exits: np.ndarray,
    labels: np.ndarray,
    cfg: Any,
    out_dir: Path,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Figures and numbers comparing the certified gate and softmax policies on val_test."""
    from scipy import special

    from stage1_core.calibration.gate import GateCalibrator, gate_auroc, gate_events, score_ece
    from stage1_core.policies import SoftmaxExitPolicy
    from stage1_core.reporting.exit_figures import plot_fnr_coverage, plot_score_histograms
    from stage1_core.reporting.figures import plot_reliability

    preds = probs.argmax(1)
    calibrator = GateCalibrator.from_dict({"method": policy_doc["calibrator_type"], "event": policy_doc["calibrator_event"],
                                           "params": policy_doc["calibrator_params"], "n_fit": policy_doc["calibrator_n_fit"]})
    calibrated = calibrator.predict(raw_gate)
    raw_sigmoid = special.expit(raw_gate)
    events = gate_events(preds, labels, calibrator.event).astype(float)
    soft_exits = SoftmaxExitPolicy(policy_doc["softmax_comparison"]["exit_threshold"]).decide(probs).exit
    gate = _exit_summary(gate_exits, preds, labels)
    softmax = _exit_summary(soft_exits, preds, labels)
    diff = paired_bootstrap_difference(gate_exits, soft_exits, cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
    accuracy_diff = paired_bootstrap_exit_accuracy_difference(preds == labels, gate_exits, soft_exits,
                                                              cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
    calibration = {
        "event": calibrator.event,
        "ece_raw_sigmoid": score_ece(raw_sigmoid, events), "ece_calibrated": score_ece(calibrated, events),
        "brier_raw_sigmoid": _brier(raw_sigmoid, events), "brier_calibrated": _brier(calibrated, events),
        "gate_auroc": gate_auroc(raw_gate, events),
    }
    figures = {
        "FNR on exits vs coverage, gate and softmax (val_test)": plot_fnr_coverage(
            {"softmax max(p)": (probs.max(1), preds), "calibrated gate": (calibrated, preds)}, labels,
            float(policy_doc["target_fnr"]), out_dir / "gate_vs_softmax.png",
            operating={"softmax max(p)": softmax["coverage"], "calibrated gate": gate["coverage"]}),
        "gate reliability (val_test)": plot_reliability(np.stack([1 - calibrated, calibrated], 1), events.astype(int),
                                                        out_dir / "gate_reliability.png",
                                                        title="Calibrated gate reliability (val_test)"),
        "gate score by outcome (val_test)": plot_score_histograms(calibrated, preds, labels,
                                                                  out_dir / "gate_histograms.png",
                                                                  threshold=policy_doc["gate_threshold"]),
    }
    return {"gate": gate, "softmax": softmax, "coverage_gain": diff, "exit_accuracy_difference": accuracy_diff,
            "calibration": calibration}, figures
