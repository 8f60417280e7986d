"""Calibration metrics: ECE (baseline-exact), classwise ECE, NLL and Brier score."""

from __future__ import annotations

import numpy as np

from ._inputs import as_labels, as_probs

__all__ = ["compute_ece", "classwise_ece", "compute_nll", "compute_brier", "bin_edges", "bin_index"]


def bin_edges(n_bins: int) -> np.ndarray:
    """The ``n_bins + 1`` equal-width edges on [0, 1] the baseline uses."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each value for bins (lo, hi]; -1 for values outside every bin (exactly 0).

    Uses the same comparisons as the baseline (``value > lo`` and ``value <= hi``).
    """
    edges = bin_edges(n_bins)
    idx = np.searchsorted(edges, values, side="left") - 1
    return np.where((values > 0.0) & (values <= 1.0), idx, -1)


def reliability_bins(probs, labels, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (lo, hi]: sample count, number correct, sum of confidences."""
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0], n_classes=p.shape[1])
    confidences = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = bin_index(confidences, n_bins)
    inside = bins >= 0
    counts = np.bincount(bins[inside], minlength=n_bins)
    acc_sum = np.bincount(bins[inside], weights=correct[inside], minlength=n_bins)
    conf_sum = np.bincount(bins[inside], weights=confidences[inside], minlength=n_bins)
    return counts, acc_sum, conf_sum


def compute_ece(probs, labels, n_bins: int = 10) -> float:
    """Expected calibration error exactly as ``train_stage1_head.py`` computes it.

    confidence = max probability, prediction = argmax, ``n_bins`` equal bins (lo, hi],
    ECE = sum over non-empty bins of (bin count / n) * |accuracy - mean confidence|.
    """
    counts, acc_sum, conf_sum = reliability_bins(probs, labels, n_bins)
    # sum_b (count_b / n) |acc_b - conf_b| = sum_b |acc_sum_b - conf_sum_b| / n
    n = as_probs(probs).shape[0]
    return float(np.abs(acc_sum - conf_sum).sum() / n) if counts.any() else 0.0


def classwise_ece(probs, labels, n_bins: int = 10) -> float:
    """Classwise ECE (Kull et al. 2019): mean over classes k of the ECE of p_k against 1[y == k].

    Bins are [0, 1/B], (1/B, 2/B], ..., (1 - 1/B, 1], so p_k = 0 falls in the first bin.
    """
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0], n_classes=p.shape[1])
    n = p.shape[0]
    per_class = []
    for k in range(p.shape[1]):
        pk = p[:, k]
        bins = np.maximum(bin_index(pk, n_bins), 0)
        hit = np.bincount(bins, weights=(y == k).astype(np.float64), minlength=n_bins)
        conf = np.bincount(bins, weights=pk, minlength=n_bins)
        per_class.append(np.abs(hit - conf).sum() / n)
    return float(np.mean(per_class))


def compute_nll(probs, labels, eps: float = 1e-12) -> float:
    """Negative log-likelihood -mean(log p_y); p_y is clipped at ``eps`` so a hard 0 stays finite."""
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0], n_classes=p.shape[1])
    py = p[np.arange(p.shape[0]), y]
    return float(-np.mean(np.log(np.clip(py, eps, 1.0))))


def compute_brier(probs, labels) -> float:
    """Brier score: mean over all N x C entries of (p - onehot(y))^2."""
    p = as_probs(probs)
    y = as_labels(labels, n=p.shape[0], n_classes=p.shape[1])
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean((p - onehot) ** 2))
