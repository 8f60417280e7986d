"""Per-level robustness figures of a deployed policy, and the subnet's reward, simulated.

One row per view of val_test (the mixture the certificate covers, each challenge level, the
clean images): coverage, FNR on exits with its one-sided Clopper-Pearson bound and the p-value
of "FNR > target", exit accuracy, and at the deployment prior (the validators' 50/50 labels) the
accuracy and MCC of ``round(p_roadwork)`` and the subnet's reward. The certificate covers the
mixture only: per-level figures are descriptive, and a level is flagged only when its FNR is
significantly above the target after a Holm correction over the levels (:func:`holm_flags`).

Reward as the validator computes it (METHODS section 8): answers are rounded with ``np.round``
(0.5 is class 0); ``(0.5 * MCC + 0.5 * accuracy) ** 3`` with MCC over the last 100 answers
(clipped at 0; 0 when either the labels or the answers hold one class) and accuracy over the last
10. :func:`simulated_reward` draws windows of 100 challenges (labels 50/50, an image of that class
uniformly) and averages the reward over ``n_windows`` windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MCC_WINDOW = 100
ACCURACY_WINDOW = 10


def served_answers(p_roadwork: np.ndarray) -> np.ndarray:
    """The validator's reading of a miner's float: ``np.round`` (half to even: 0.5 -> 0)."""
    return np.round(np.asarray(p_roadwork, dtype=np.float64)).astype(int)


def _mcc_rows(labels: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """MCC of each row of ``[W, n]`` label / answer matrices; 0 when a row has one class on either side."""
    y, a = labels.astype(np.float64), answers.astype(np.float64)
    tp = (y * a).sum(1)
    tn = ((1 - y) * (1 - a)).sum(1)
    fp = ((1 - y) * a).sum(1)
    fn = (y * (1 - a)).sum(1)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)


def simulated_reward(labels: np.ndarray, p_roadwork: np.ndarray, n_windows: int = 2000, prior: float = 0.5,
                     seed: int = 0) -> float:
    """Mean reward over ``n_windows`` simulated windows of 100 challenges at label prior ``prior``."""
    labels = np.asarray(labels, dtype=int)
    answers = served_answers(p_roadwork)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"the reward needs both classes ({len(pos)} positives, {len(neg)} negatives)")
    rng = np.random.default_rng(seed)
    is_pos = rng.random((n_windows, MCC_WINDOW)) < prior
    index = np.where(is_pos, pos[rng.integers(0, len(pos), is_pos.shape)], neg[rng.integers(0, len(neg), is_pos.shape)])
    y, a = labels[index], answers[index]
    mcc = np.clip(_mcc_rows(y, a), 0.0, None)
    accuracy = (y[:, -ACCURACY_WINDOW:] == a[:, -ACCURACY_WINDOW:]).mean(1)
    return float(np.mean((0.5 * mcc + 0.5 * accuracy) ** 3))


def prior_confusion(labels: np.ndarray, answers: np.ndarray, prior: float) -> dict[str, float]:
    """Accuracy and MCC of ``answers`` when the class prior is ``prior`` (per-class rates reweighted)."""
    labels, answers = np.asarray(labels, dtype=int), np.asarray(answers, dtype=int)
    tpr = float((answers[labels == 1] == 1).mean()) if (labels == 1).any() else float("nan")
    tnr = float((answers[labels == 0] == 0).mean()) if (labels == 0).any() else float("nan")
    tp, fn = prior * tpr, prior * (1 - tpr)
    tn, fp = (1 - prior) * tnr, (1 - prior) * (1 - tnr)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0
    return {"accuracy": float(tp + tn), "mcc": mcc}


def robustness_row(name: str, labels: np.ndarray, exits: np.ndarray, exit_labels: np.ndarray, p_roadwork: np.ndarray,
                   target_fnr: float, delta: float, deploy_prior: float = 0.5, n_windows: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """The figures of one view (see the module docstring); FNR is None when no positive exits."""
    from scipy.stats import binom

    from stage1_core.calibration.bounds import fnr_upper_bound
    from stage1_core.metrics.exit import coverage_at_prior

    labels = np.asarray(labels, dtype=int)
    exits = np.asarray(exits, dtype=bool)
    exit_labels = np.asarray(exit_labels, dtype=int)
    exited_pos = exits & (labels == 1)
    n, k = int(exited_pos.sum()), int((exited_pos & (exit_labels == 0)).sum())
    answers = served_answers(p_roadwork)
    at_prior = prior_confusion(labels, answers, deploy_prior)
    return {
        "view": name,
        "n": int(len(labels)),
        "coverage": float(exits.mean()) if len(labels) else 0.0,
        "coverage_at_deploy_prior": float(coverage_at_prior(exits, labels, deploy_prior)),
        "n_exited_positives": n,
        "n_false_negatives": k,
        "fnr_on_exits": (k / n) if n else None,
        "fnr_upper_bound": float(fnr_upper_bound(k, n, delta)) if n else 1.0,
        "p_value_fnr_above_target": float(binom.sf(k - 1, n, target_fnr)) if n else None,
        "exit_accuracy": float((exit_labels[exits] == labels[exits]).mean()) if exits.any() else None,
        "accuracy_round_p": at_prior["accuracy"],
        "mcc_round_p": at_prior["mcc"],
        "reward": simulated_reward(labels, p_roadwork, n_windows=n_windows, prior=deploy_prior, seed=seed),
    }


def holm_flags(p_values: Sequence[float | None], alpha: float) -> list[bool]:
    """Holm's step-down over the non-missing p-values: True where H0 "FNR <= target" is rejected."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    flags = [False] * len(p_values)
    m = len(present)
    for rank, (p, i) in enumerate(sorted(present)):
        if p > alpha / (m - rank):
            break
        flags[i] = True
    return flags


def robustness_table(views: Mapping[str, Mapping[str, np.ndarray]], target_fnr: float, delta: float, alpha: float,
                     deploy_prior: float = 0.5, n_windows: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Rows for each named view (``labels``, ``exit``, ``exit_label``, ``p_roadwork`` arrays).

    Views named ``level*`` form the Holm family: their ``significantly_above_target`` is the
    corrected verdict at ``alpha``; other rows (mixture, clean) get None (the mixture is judged by
    the val_test criterion, the clean row is context).
    """
    rows = [robustness_row(name, v["labels"], v["exit"], v["exit_label"], v["p_roadwork"], target_fnr, delta,
                           deploy_prior, n_windows, seed) for name, v in views.items()]
    levels = [i for i, r in enumerate(rows) if r["view"].startswith("level")]
    flags = holm_flags([rows[i]["p_value_fnr_above_target"] for i in levels], alpha)
    for row in rows:
        row["significantly_above_target"] = None
    for i, flag in zip(levels, flags):
        rows[i]["significantly_above_target"] = bool(flag)
    return rows
