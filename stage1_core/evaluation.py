"""Evaluation on val_test: every reported metric with its percentile-bootstrap interval.

It receives the decisions the deployed predictor made (``ExitPolicy.decide`` through the
bundle), it never makes them, so evaluation and deployment cannot drift. The pass/fail verdict on
FNR_on_exited uses the one-sided Clopper-Pearson bound (row ``fnr_on_exited_cp_upper``); the
bootstrap interval of FNR is descriptive and degenerates when misses are rare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .artifacts import atomic_write_text
from .calibration.bounds import fnr_upper_bound
from .metrics import bootstrap as bs
from .metrics._inputs import as_labels, as_probs, as_scores
from .metrics.exit import ExitMetrics, coverage_at_prior, exit_metrics
from .policies.base import Decisions

__all__ = ["EvaluationReport", "evaluate_decisions", "TABLE_COLUMNS", "METRIC_ORDER"]

TABLE_COLUMNS: tuple[str, ...] = ("metric", "value", "mean", "std", "ci_lower", "ci_upper", "n")
METRIC_ORDER: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "mcc",
    "ece",
    "classwise_ece",
    "nll",
    "brier",
    "augrc",
    "aurc",
    "coverage",
    "rejection_rate",
    "average_set_size",
    "coverage_at_deploy_prior",
    "fnr_on_exited",
    "fnr_on_exited_cp_upper",
    "fnr_on_exited_undefined_resamples",
    "exit_accuracy",
    *(f"risk@{c:g}" for c in bs.RISK_AT_COVERAGES),
    *(f"coverage@{r:g}" for r in bs.COVERAGE_AT_RISKS),
)


@dataclass
class EvaluationReport:
    """``table`` has one row per metric (columns :data:`TABLE_COLUMNS`); ``headline`` the figures
    a README or a gate quotes; ``exit`` the counts behind the exit metrics."""

    table: pd.DataFrame
    headline: dict[str, Any]
    exit: ExitMetrics
    bootstrap: dict[str, bs.BootstrapResult] = field(repr=False)

    def to_csv(self, path: str | Path) -> Path:
        """Write ``metrics.csv`` atomically."""
        return atomic_write_text(path, self.table.to_csv(index=False))

    def row(self, metric: str) -> dict[str, Any]:
        """The table row of ``metric`` as a dict."""
        hit = self.table[self.table["metric"] == metric]
        if hit.empty:
            raise KeyError(f"no metric {metric!r} in the evaluation table")
        return hit.iloc[0].to_dict()


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate_decisions(
    probs,
    labels,
    decisions: Decisions,
    *,
    deploy_prior: float,
    target_fnr: float,
    delta: float,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    scores=None,
) -> EvaluationReport:
    """Metrics of ``decisions`` on a labelled set (val_test), with bootstrap intervals.

    ``scores`` rank samples for the selective metrics (AUGRC, Risk@Coverage, ...); default
    is the top softmax probability. ``deploy_prior`` is P(roadwork) at deployment,
    ``target_fnr``/``delta`` the promise the Clopper-Pearson row is judged against.
    """
    p = as_probs(probs)
    if p.shape[1] != 2:
        raise ValueError(f"evaluation is binary: probs must be [N, 2], got {p.shape}")
    y = as_labels(labels, n=p.shape[0])
    n = y.shape[0]
    if len(decisions) != n:
        raise ValueError(f"decisions cover {len(decisions)} samples but probs have {n} rows")
    preds = np.asarray(decisions.label, dtype=np.int64)
    exits = np.asarray(decisions.exit, dtype=bool)
    conf = p.max(axis=1) if scores is None else as_scores(scores, "scores", n=n)
    residuals = (preds != y).astype(np.float64)

    statistic = bs.combine(
        bs.accuracy_statistic(y, preds),
        bs.balanced_accuracy_statistic(y, preds),
        bs.mcc_statistic(y, preds),
        bs.ece_statistic(p, y),
        bs.classwise_ece_statistic(p, y),
        bs.nll_statistic(p, y),
        bs.brier_statistic(p, y),
        bs.selective_statistic(conf, residuals),
        bs.coverage_statistic(exits),
        bs.set_statistic(exits, decisions.prediction_sets),
        bs.coverage_at_prior_statistic(exits, y, deploy_prior),
        bs.exit_statistic(exits, preds, y),
    )
    boot = bs.bootstrap(statistic, n, n_resamples=n_bootstrap, confidence=confidence, seed=seed)
    em = exit_metrics(exits, preds, y)
    cp_upper = fnr_upper_bound(em.n_false_negatives, em.n_exited_positives, delta)

    support = {"fnr_on_exited": em.n_exited_positives, "exit_accuracy": em.n_exited}
    rows = []
    for metric in METRIC_ORDER:
        if metric == "fnr_on_exited_cp_upper":
            rows.append((metric, cp_upper, np.nan, np.nan, np.nan, np.nan, em.n_exited_positives))
        elif metric == "fnr_on_exited_undefined_resamples":
            r = boot["fnr_on_exited"]
            rows.append((metric, float(r.n_undefined), np.nan, np.nan, np.nan, np.nan, r.n_resamples))
        else:
            r = boot[metric]
            rows.append((metric, r.value, r.mean, r.std, r.ci_lower, r.ci_upper, support.get(metric, n)))
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["n"] = table["n"].astype(np.int64)

    headline = {
        "n_test": n,
        "accuracy": boot["accuracy"].value,
        "balanced_accuracy": boot["balanced_accuracy"].value,
        "mcc": boot["mcc"].value,
        "ece": boot["ece"].value,
        "classwise_ece": boot["classwise_ece"].value,
        "augrc": boot["augrc"].value,
        "coverage": em.coverage,
        "rejection_rate": boot["rejection_rate"].value,
        "average_set_size": boot["average_set_size"].value,
        "coverage_at_deploy_prior": coverage_at_prior(exits, y, deploy_prior),
        "deploy_prior": float(deploy_prior),
        "fnr_on_exited": em.fnr_on_exited,
        "fnr_on_exited_ci": [
            _none_if_nan(boot["fnr_on_exited"].ci_lower),
            _none_if_nan(boot["fnr_on_exited"].ci_upper),
        ],
        "fnr_on_exited_cp_upper": cp_upper,
        "target_fnr_exit": float(target_fnr),
        "delta": float(delta),
        "target_fnr_exit_met": bool(em.n_exited_positives > 0 and cp_upper <= target_fnr),
        "exit_accuracy": em.exit_accuracy,
        "n_exited": em.n_exited,
        "n_exited_positives": em.n_exited_positives,
        "n_false_negatives": em.n_false_negatives,
        "n_bootstrap": int(n_bootstrap),
        "bootstrap_confidence": float(confidence),
    }
    return EvaluationReport(table=table, headline=headline, exit=em, bootstrap=boot)
