"""Vectorised percentile bootstrap for every reported metric.

A resample is represented by its count vector (how often each sample was drawn), so a whole
block of resamples is one weight matrix ``W`` of shape [B, N] and each metric becomes a few
matrix products over ``W`` instead of B calls of Python metric code. A *statistic* is a function
``W -> {name: values[B]}``; the factories below build one per metric from the fixed per-sample
arrays. Calling a statistic with ``W = ones((1, N))`` gives the point estimate.

Ratios that are undefined in a resample (FNR with no exited positive, ...) are NaN there; they
are counted in ``n_undefined`` and left out of mean, std and percentiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from ._inputs import as_labels, as_mask, as_probs, as_scores
from .calibration import bin_index
from .selective import COVERAGE_AT_RISKS, LEVEL_TOL, RISK_AT_COVERAGES

__all__ = [
    "BootstrapResult",
    "Statistic",
    "bootstrap",
    "bootstrap_distribution",
    "resample_indices",
    "counts_from_indices",
    "combine",
    "accuracy_statistic",
    "balanced_accuracy_statistic",
    "mcc_statistic",
    "ece_statistic",
    "classwise_ece_statistic",
    "nll_statistic",
    "brier_statistic",
    "selective_statistic",
    "coverage_statistic",
    "set_statistic",
    "coverage_at_prior_statistic",
    "exit_statistic",
]

Statistic = Callable[[np.ndarray], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate and percentile-bootstrap summary of one metric."""

    value: float
    mean: float
    std: float
    ci_lower: float
    ci_upper: float
    n_resamples: int
    n_undefined: int

    def to_dict(self) -> dict:
        return asdict(self)


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[B, n] matrix of indices drawn with replacement (seeded, reproducible)."""
    if n < 1 or n_resamples < 1:
        raise ValueError(f"need n >= 1 and n_resamples >= 1, got n={n}, n_resamples={n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n), dtype=np.int64)


def counts_from_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """Count matrix [B, n] (float64) of an index matrix [B, n_draws]."""
    b = indices.shape[0]
    flat = (indices + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def combine(*statistics: Statistic) -> Statistic:
    """One statistic computing all of ``statistics`` (names must be distinct)."""

    def stat(w: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s in statistics:
            part = s(w)
            clash = out.keys() & part.keys()
            if clash:
                raise ValueError(f"duplicate statistic names: {sorted(clash)}")
            out.update(part)
        return out

    return stat


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_distribution(
    statistic: Statistic,
    n_samples: int,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    indices: np.ndarray | None = None,
    chunk_size: int = 100,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``(point estimates, per-resample values)`` of every value ``statistic`` returns.

    The resamples are those :func:`bootstrap` summarises (same ``seed`` and ``n_resamples``, same
    draws), so a plot of the distribution matches the reported intervals. NaN marks a resample
    where the metric is undefined.
    """
    if indices is None:
        indices = resample_indices(n_samples, n_resamples, seed)
    elif indices.ndim != 2 or indices.shape[1] != n_samples:
        raise ValueError(f"indices must have shape [B, {n_samples}], got {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_samples):
        raise ValueError(f"indices must lie in 0..{n_samples - 1}")
    point = {k: float(np.asarray(v)[0]) for k, v in statistic(np.ones((1, n_samples))).items()}
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for start in range(0, indices.shape[0], chunk_size):
        w = counts_from_indices(indices[start : start + chunk_size], n_samples)
        for k, v in statistic(w).items():
            chunks[k].append(np.asarray(v, dtype=np.float64))
    return point, {k: np.concatenate(parts) for k, parts in chunks.items()}


def bootstrap(
    statistic: Statistic,
    n_samples: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    indices: np.ndarray | None = None,
    chunk_size: int = 100,
) -> dict[str, BootstrapResult]:
    """Percentile bootstrap of every value ``statistic`` returns.

    ``indices`` (an [B, n_samples] index matrix) overrides ``n_resamples``/``seed``; resamples are
    processed ``chunk_size`` at a time to bound memory (B x N float64 per chunk).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    point, distribution = bootstrap_distribution(statistic, n_samples, n_resamples=n_resamples, seed=seed,
                                                 indices=indices, chunk_size=chunk_size)
    alpha = (1.0 - confidence) / 2.0
    results = {}
    for k, values in distribution.items():
        defined = values[~np.isnan(values)]
        if defined.size:
            lo, hi = np.percentile(defined, [100 * alpha, 100 * (1 - alpha)])
            mean = float(defined.mean())
            std = float(defined.std(ddof=1)) if defined.size > 1 else 0.0
        else:
            lo = hi = mean = std = float("nan")
        results[k] = BootstrapResult(
            value=point[k],
            mean=mean,
            std=std,
            ci_lower=float(lo),
            ci_upper=float(hi),
            n_resamples=int(values.size),
            n_undefined=int(values.size - defined.size),
        )
    return results


def _totals(w: np.ndarray) -> np.ndarray:
    return w.sum(axis=1)


def accuracy_statistic(labels, preds, name: str = "accuracy") -> Statistic:
    y = as_labels(labels)
    correct = (as_labels(preds, n=y.shape[0], name="preds") == y).astype(np.float64)
    return lambda w: {name: w @ correct / _totals(w)}


def _confusion(w: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    cols = np.stack([(y == 1) & (p == 1), (y == 0) & (p == 0), (y == 0) & (p == 1), (y == 1) & (p == 0)], 1)
    tp, tn, fp, fn = (w @ cols.astype(np.float64)).T
    return tp, tn, fp, fn


def balanced_accuracy_statistic(labels, preds, name: str = "balanced_accuracy") -> Statistic:
    """Mean recall over the classes present in the resample."""
    y = as_labels(labels)
    p = as_labels(preds, n=y.shape[0], name="preds")

    def stat(w):
        tp, tn, fp, fn = _confusion(w, y, p)
        pos, neg = tp + fn, tn + fp
        recall_pos = np.where(pos > 0, tp / np.where(pos > 0, pos, 1.0), 0.0)
        recall_neg = np.where(neg > 0, tn / np.where(neg > 0, neg, 1.0), 0.0)
        present = (pos > 0).astype(np.float64) + (neg > 0)
        return {name: (recall_pos + recall_neg) / present}

    return stat


def mcc_statistic(labels, preds, name: str = "mcc") -> Statistic:
    """Matthews correlation in scikit-learn's covariance form (0 when undefined)."""
    y = as_labels(labels)
    p = as_labels(preds, n=y.shape[0], name="preds")

    def stat(w):
        tp, tn, fp, fn = _confusion(w, y, p)
        n = tp + tn + fp + fn
        t_pos, t_neg, p_pos, p_neg = tp + fn, tn + fp, tp + fp, tn + fn
        cov_ytyp = (tp + tn) * n - (t_pos * p_pos + t_neg * p_neg)
        cov_ypyp = n * n - (p_pos * p_pos + p_neg * p_neg)
        cov_ytyt = n * n - (t_pos * t_pos + t_neg * t_neg)
        den = cov_ytyt * cov_ypyp
        with np.errstate(invalid="ignore", divide="ignore"):
            return {name: np.where(den > 0, cov_ytyp / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)}

    return stat


def ece_statistic(probs, labels, n_bins: int = 10, name: str = "ece") -> Statistic:
    """Baseline ECE: sum_b |sum correct - sum confidence| over bin b, divided by n."""
    pr = as_probs(probs)
    y = as_labels(labels, n=pr.shape[0], n_classes=pr.shape[1])
    conf = pr.max(axis=1)
    correct = (pr.argmax(axis=1) == y).astype(np.float64)
    bins = bin_index(conf, n_bins)
    onehot = np.zeros((pr.shape[0], n_bins))
    inside = bins >= 0
    onehot[np.flatnonzero(inside), bins[inside]] = 1.0
    gap = onehot * (correct - conf)[:, None]
    return lambda w: {name: np.abs(w @ gap).sum(axis=1) / _totals(w)}


def classwise_ece_statistic(probs, labels, n_bins: int = 10, name: str = "classwise_ece") -> Statistic:
    """Classwise ECE (:func:`~stage1_core.metrics.calibration.classwise_ece`) per resample."""
    pr = as_probs(probs)
    y = as_labels(labels, n=pr.shape[0], n_classes=pr.shape[1])
    gaps = []
    for k in range(pr.shape[1]):
        pk = pr[:, k]
        onehot = np.zeros((pr.shape[0], n_bins))
        onehot[np.arange(pr.shape[0]), np.maximum(bin_index(pk, n_bins), 0)] = 1.0
        gaps.append(onehot * ((y == k).astype(np.float64) - pk)[:, None])
    return lambda w: {name: np.mean([np.abs(w @ gap).sum(axis=1) for gap in gaps], axis=0) / _totals(w)}


def set_statistic(exit_mask, prediction_sets) -> Statistic:
    """``rejection_rate`` (deferred fraction, 1 - coverage) and ``average_set_size`` per resample.

    Every policy answers with a prediction set (an exited sample its label, a deferred one
    ``{0, 1}``; SCRC its own sets), so the average set size is defined for all of them.
    """
    deferred = (~np.asarray(exit_mask, dtype=bool)).astype(np.float64)
    sizes = np.asarray([len(s) for s in prediction_sets], dtype=np.float64)
    if deferred.ndim != 1 or sizes.shape != deferred.shape:
        raise ValueError(f"exit_mask {deferred.shape} and prediction_sets ({sizes.shape[0]}) must be 1-D of one length")
    return lambda w: {"rejection_rate": w @ deferred / _totals(w), "average_set_size": w @ sizes / _totals(w)}


def nll_statistic(probs, labels, eps: float = 1e-12, name: str = "nll") -> Statistic:
    pr = as_probs(probs)
    y = as_labels(labels, n=pr.shape[0], n_classes=pr.shape[1])
    loss = -np.log(np.clip(pr[np.arange(pr.shape[0]), y], eps, 1.0))
    return lambda w: {name: w @ loss / _totals(w)}


def brier_statistic(probs, labels, name: str = "brier") -> Statistic:
    pr = as_probs(probs)
    y = as_labels(labels, n=pr.shape[0], n_classes=pr.shape[1])
    per_sample = np.mean((pr - np.eye(pr.shape[1])[y]) ** 2, axis=1)
    return lambda w: {name: w @ per_sample / _totals(w)}


def selective_statistic(
    confidence,
    residuals,
    coverages: Iterable[float] = RISK_AT_COVERAGES,
    risks: Iterable[float] = COVERAGE_AT_RISKS,
    prefix: str = "",
) -> Statistic:
    """AUGRC, AURC, Risk@c and Coverage@r with the semantics of :mod:`.selective`.

    Samples are sorted once by decreasing confidence; per resample, tie groups are summed with
    ``np.add.reduceat`` and the curve is built from cumulative sums. Groups a resample did not
    draw add zero-width segments and never change a value.
    """
    conf = as_scores(confidence, "confidence")
    res = as_scores(residuals, "residuals", n=conf.shape[0])
    order = np.argsort(-conf, kind="stable")
    sorted_conf = conf[order]
    starts = np.flatnonzero(np.r_[True, sorted_conf[1:] != sorted_conf[:-1]])
    res_sorted = res[order]
    coverages, risks = tuple(coverages), tuple(risks)

    ties = starts.shape[0] < order.shape[0]

    def stat(w):
        ws = w[:, order]
        weighted_err = ws * res_sorted
        if ties:
            group_n = np.add.reduceat(ws, starts, axis=1)
            group_err = np.add.reduceat(weighted_err, starts, axis=1)
        else:
            group_n, group_err = ws, weighted_err
        accepted = np.cumsum(group_n, axis=1)
        errors = np.cumsum(group_err, axis=1)
        total = accepted[:, -1:]
        drawn = accepted > 0
        sel_risk = np.where(drawn, errors / np.where(drawn, accepted, 1.0), 0.0)
        rows = np.arange(w.shape[0])
        first = np.argmax(drawn, axis=1)
        first_risk = sel_risk[rows, first][:, None]
        sel_risk = np.where(drawn, sel_risk, first_risk)
        # Trapezoids in closed form: segment g spans coverage group_n/total; AUGRC's heights are
        # errors/total and (errors - group_err)/total, AURC's the selective risks at both ends
        # (the first drawn group's segment starts at coverage 0 with its own risk).
        augrc_value = (group_n * (2.0 * errors - group_err)).sum(axis=1) / (2.0 * total[:, 0] ** 2)
        previous = np.hstack([first_risk, sel_risk[:, :-1]])
        aurc_value = (group_n * (sel_risk + previous)).sum(axis=1) / (2.0 * total[:, 0])
        out = {f"{prefix}augrc": augrc_value, f"{prefix}aurc": aurc_value}
        last = accepted.shape[1] - 1
        for c in coverages:
            g = np.minimum(np.count_nonzero(accepted < (c - LEVEL_TOL) * total, axis=1), last)
            out[f"{prefix}risk@{c:g}"] = sel_risk[rows, g]
        for r in risks:
            ok = drawn & (errors <= (r + LEVEL_TOL) * accepted)
            out[f"{prefix}coverage@{r:g}"] = np.where(ok, accepted, 0.0).max(axis=1) / total[:, 0]
        return out

    return stat


def coverage_statistic(exit_mask, name: str = "coverage") -> Statistic:
    exits = np.asarray(exit_mask, dtype=bool).astype(np.float64)
    if exits.ndim != 1:
        raise ValueError(f"exit_mask must be 1-D, got shape {exits.shape}")
    return lambda w: {name: w @ exits / _totals(w)}


def coverage_at_prior_statistic(
    exit_mask, labels, deploy_prior: float, name: str = "coverage_at_deploy_prior"
) -> Statistic:
    """``deploy_prior * coverage_pos + (1 - deploy_prior) * coverage_neg`` per resample.

    NaN in a resample that lacks a class the deployment prior gives weight to.
    """
    if not 0.0 <= deploy_prior <= 1.0:
        raise ValueError(f"deploy_prior must lie in [0, 1], got {deploy_prior!r}")
    y = as_labels(labels)
    exits = as_mask(exit_mask, y.shape[0], "exit_mask")
    cols = np.stack([exits & (y == 1), y == 1, exits & (y == 0), y == 0], 1).astype(np.float64)

    def stat(w):
        ex_pos, pos, ex_neg, neg = (w @ cols).T
        cov_pos = _ratio(ex_pos, pos) if deploy_prior > 0 else np.zeros(w.shape[0])
        cov_neg = _ratio(ex_neg, neg) if deploy_prior < 1 else np.zeros(w.shape[0])
        return {name: deploy_prior * cov_pos + (1.0 - deploy_prior) * cov_neg}

    return stat


def exit_statistic(exit_mask, preds, labels, prefix: str = "") -> Statistic:
    """``fnr_on_exited`` (NaN without exited positive) and ``exit_accuracy`` (NaN without exits)."""
    y = as_labels(labels)
    exits = as_mask(exit_mask, y.shape[0], "exit_mask")
    p = as_labels(preds, n=y.shape[0], name="preds")
    pos = exits & (y == 1)
    cols = np.stack([pos & (p == 0), pos, exits & (p == y), exits], 1).astype(np.float64)

    def stat(w):
        fn, n_pos, correct, n_exit = (w @ cols).T
        return {f"{prefix}fnr_on_exited": _ratio(fn, n_pos), f"{prefix}exit_accuracy": _ratio(correct, n_exit)}

    return stat
