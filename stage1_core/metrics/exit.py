"""Metrics of an exit policy: coverage, FNR on exited positives, exit accuracy, and their counts.

FNR_on_exited = #(exit, y=1, pred=0) / #(exit, y=1). With no exited positive it is undefined
(``None``), never 0: an empty denominator says nothing about the miss rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ._inputs import as_labels, as_mask

__all__ = ["ExitMetrics", "exit_metrics", "coverage_at_prior", "prior_weights"]


@dataclass(frozen=True)
class ExitMetrics:
    """Counts and rates of one exit decision on one labelled set."""

    n: int
    n_exited: int
    coverage: float
    n_exited_positives: int
    n_false_negatives: int
    fnr_on_exited: float | None
    exit_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def exit_metrics(exit_mask, preds, labels) -> ExitMetrics:
    """Coverage, FNR_on_exited and exit_accuracy of ``exit_mask`` with predictions ``preds``."""
    y = as_labels(labels)
    n = y.shape[0]
    if n == 0:
        raise ValueError("exit_metrics needs at least one sample")
    exits = as_mask(exit_mask, n, "exit_mask")
    pred = as_labels(preds, n=n, name="preds")
    n_exited = int(exits.sum())
    exited_pos = exits & (y == 1)
    n_pos = int(exited_pos.sum())
    n_fn = int((exited_pos & (pred == 0)).sum())
    n_correct = int((exits & (pred == y)).sum())
    return ExitMetrics(
        n=n,
        n_exited=n_exited,
        coverage=n_exited / n,
        n_exited_positives=n_pos,
        n_false_negatives=n_fn,
        fnr_on_exited=n_fn / n_pos if n_pos else None,
        exit_accuracy=n_correct / n_exited if n_exited else None,
    )


def prior_weights(labels, deploy_prior: float) -> np.ndarray:
    """Importance weight pi_deploy(y) / pi_calib(y) of each sample (``deploy_prior`` = P(y=1))."""
    if not 0.0 <= deploy_prior <= 1.0:
        raise ValueError(f"deploy_prior must lie in [0, 1], got {deploy_prior!r}")
    y = as_labels(labels)
    pi_calib = float(np.mean(y == 1)) if y.size else 0.0
    if (deploy_prior > 0 and pi_calib == 0) or (deploy_prior < 1 and pi_calib == 1):
        raise ValueError(
            f"cannot reweight to deploy_prior={deploy_prior}: the labelled set has "
            f"positive fraction {pi_calib}, so one class the deployment sees is missing"
        )
    w_pos = deploy_prior / pi_calib if pi_calib > 0 else 0.0
    w_neg = (1.0 - deploy_prior) / (1.0 - pi_calib) if pi_calib < 1 else 0.0
    return np.where(y == 1, w_pos, w_neg)


def coverage_at_prior(exit_mask, labels, deploy_prior: float) -> float:
    """Coverage the policy would have if P(y=1) were ``deploy_prior``.

    Equals ``deploy_prior * coverage_pos + (1 - deploy_prior) * coverage_neg`` (importance
    weights pi_deploy / pi_calib per class). FNR_on_exited needs no such correction: it
    conditions on y=1.
    """
    y = as_labels(labels)
    exits = as_mask(exit_mask, y.shape[0], "exit_mask")
    w = prior_weights(y, deploy_prior)
    return float(np.sum(w * exits) / np.sum(w))
