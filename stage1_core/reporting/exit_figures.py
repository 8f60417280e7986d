"""Figures comparing exit scores: FNR on exits vs coverage per score, and gate-score histograms.

Used in phase 3+ to put the learned gate next to the softmax confidence on one plot, and to show
where the gate puts correct answers, false negatives and false positives.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..calibration.threshold_sweep import score_candidate_table  # noqa: E402
from .figures import _save  # noqa: E402

__all__ = ["plot_fnr_coverage", "plot_score_histograms"]


def plot_fnr_coverage(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    target: float,
    out_path: str | Path,
    operating: Mapping[str, float] | None = None,
    title: str = "FNR on exited samples vs coverage (val_test)",
) -> Path:
    """One line per exit score: empirical FNR_on_exited at every coverage the score can reach.

    ``curves`` maps a name to ``(scores, predictions)``; ``operating`` to the coverage each
    certified policy deploys (marked with a dot).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (scores, preds) in curves.items():
        table = score_candidate_table(scores, preds, labels)
        coverage = table.n_exited / table.n_calib
        with np.errstate(invalid="ignore", divide="ignore"):
            fnr = np.where(table.n_exited_positives > 0, table.n_false_negatives / table.n_exited_positives, np.nan)
        line = ax.plot(coverage, fnr, label=name, linewidth=1.6)[0]
        if operating and name in operating and operating[name] is not None:
            c = float(operating[name])
            i = int(np.argmin(np.abs(coverage - c)))
            ax.plot([coverage[i]], [fnr[i]], "o", color=line.get_color())
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("coverage (fraction exited)")
    ax.set_ylabel("FNR on exited positives")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(3 * target, 0.05))
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out_path)


def plot_score_histograms(
    scores: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    out_path: str | Path,
    threshold: float | None = None,
    title: str = "Calibrated gate score by outcome (val_test)",
) -> Path:
    """Histograms of a score for correct answers, false negatives and false positives."""
    scores = np.asarray(scores, dtype=float)
    preds = np.asarray(predictions).astype(int)
    y = np.asarray(labels).astype(int)
    groups = {
        "correct": preds == y,
        "false negative (roadwork missed)": (y == 1) & (preds == 0),
        "false positive": (y == 0) & (preds == 1),
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(0.0, 1.0, 31)
    for name, mask in groups.items():
        if mask.any():
            ax.hist(scores[mask], bins=bins, density=True, alpha=0.5, label=f"{name} (n={int(mask.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"exit threshold {threshold:.3f}")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, out_path)
