"""Paired comparisons of two exit decisions on the same images, with percentile bootstrap CIs.

Evaluation compares the deployed policy with the policies it must beat on the same val_test
images (gate vs softmax, SCRC vs its special cases): the difference of two means (coverage,
exit accuracy) and its CI over paired resamples of the images (multinomial counts, vectorised).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stage1_core.metrics.exit import exit_metrics

__all__ = ["paired_bootstrap_augrc_gain", "paired_bootstrap_difference", "paired_bootstrap_exit_accuracy_difference", "paired_bootstrap_ece_difference", "bootstrap_mean_ci",
           "exit_summary", "brier"]


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


def paired_bootstrap_ece_difference(
    scores_a: np.ndarray, scores_b: np.ndarray, events: np.ndarray, n_resamples: int, confidence: float, seed: int,
) -> dict[str, float]:
    """Percentile CI of ECE(a) - ECE(b) of two scores for the same binary events, paired over images.

    Binned ECE is not a per-image mean, so each resample recomputes both ECEs on the same drawn
    images: the vectorised :mod:`stage1_core.metrics.bootstrap` machinery with
    :func:`~stage1_core.metrics.bootstrap.ece_statistic` on probabilities ``[1 - s, s]``.
    """
    from stage1_core.metrics.bootstrap import bootstrap, ece_statistic

    e = np.asarray(events).astype(np.int64)
    ece_a, ece_b = (ece_statistic(np.stack([1.0 - s, s], axis=1), e)
                    for s in (np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)))
    result = bootstrap(lambda w: {"difference": ece_a(w)["ece"] - ece_b(w)["ece"]}, e.shape[0],
                       n_resamples=n_resamples, confidence=confidence, seed=seed)["difference"]
    return {"difference": result.value, "ci_lower": result.ci_lower, "ci_upper": result.ci_upper,
            "n_resamples": result.n_resamples}


def brier(scores: np.ndarray, events: np.ndarray) -> float:
    return float(np.mean((scores - events) ** 2))


def exit_summary(exits: np.ndarray, preds: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    em = exit_metrics(exits, preds, labels)
    return {"coverage": float(em.coverage), "exit_accuracy": em.exit_accuracy, "fnr_on_exited": em.fnr_on_exited,
            "n_exited_positives": int(em.n_exited_positives), "n_false_negatives": int(em.n_false_negatives)}


def bootstrap_mean_ci(values: np.ndarray, n_resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Mean of ``values`` with a percentile bootstrap CI (multinomial counts, vectorised); None when empty."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        return {"value": None, "ci_lower": None, "ci_upper": None, "n": 0, "n_resamples": int(n_resamples)}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(v.size, np.full(v.size, 1.0 / v.size), size=n_resamples)
    means = counts @ v / v.size
    alpha = (1.0 - confidence) / 2.0
    return {"value": float(v.mean()), "ci_lower": float(np.quantile(means, alpha)),
            "ci_upper": float(np.quantile(means, 1.0 - alpha)), "n": int(v.size), "n_resamples": int(n_resamples)}


def paired_bootstrap_augrc_gain(
    confidence_a: np.ndarray, residuals_a: np.ndarray, confidence_b: np.ndarray, residuals_b: np.ndarray,
    n_resamples: int, confidence: float, seed: int,
) -> dict[str, float]:
    """Percentile CI of AUGRC(b) - AUGRC(a) (a's gain: lower AUGRC is better) over paired image resamples.

    Rows i of the four [N] arrays are the same image under models a and b; each resample draws
    images with replacement and recomputes both AUGRCs on the same draw.
    """
    from stage1_core.metrics.selective import augrc

    conf_a, conf_b = np.asarray(confidence_a, float), np.asarray(confidence_b, float)
    res_a, res_b = np.asarray(residuals_a, float), np.asarray(residuals_b, float)
    n = conf_a.shape[0]
    if not (conf_b.shape[0] == res_a.shape[0] == res_b.shape[0] == n) or n == 0:
        raise ValueError("paired AUGRC needs four arrays of the same non-zero length")
    rng = np.random.default_rng(seed)
    gains = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        gains[r] = augrc(conf_b[idx], res_b[idx]) - augrc(conf_a[idx], res_a[idx])
    alpha = (1.0 - confidence) / 2.0
    return {"gain": float(augrc(conf_b, res_b) - augrc(conf_a, res_a)), "augrc_a": float(augrc(conf_a, res_a)),
            "augrc_b": float(augrc(conf_b, res_b)), "ci_lower": float(np.quantile(gains, alpha)),
            "ci_upper": float(np.quantile(gains, 1.0 - alpha)), "n": int(n), "n_resamples": int(n_resamples)}
