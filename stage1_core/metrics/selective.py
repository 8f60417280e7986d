"""Selective-prediction metrics: risk-coverage curve, Risk@Coverage, Coverage@Risk, AURC, AUGRC.

Semantics follow fd-shifts (IML-DKFZ, ``fd_shifts/analysis/rc_stats_utils.py``): samples are
accepted from the most confident down; tied confidences are accepted (and removed) together, so
the curve has one point per distinct confidence value. Residuals are per-sample losses in [0, 1]
(1 = wrong prediction for the 0/1 loss).

* selective risk at a point = accepted residual sum / accepted count;
* generalized risk (Traub et al. 2024) = accepted residual sum / N;
* AUGRC = trapezoid area under generalized risk vs coverage with the point (0, 0) added. It is
  reported raw, in [0, 1]; fd-shifts displays it multiplied by 1000.
* AURC = trapezoid area under selective risk vs coverage, the curve extended to coverage 0 at
  the risk of the most confident group (fd-shifts' ``selective_risk_stats`` end point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._inputs import as_scores

__all__ = [
    "RiskCoverageCurve",
    "risk_coverage_curve",
    "risk_at_coverage",
    "coverage_at_risk",
    "aurc",
    "augrc",
    "selective_metrics",
    "RISK_AT_COVERAGES",
    "COVERAGE_AT_RISKS",
]

# Relative slack when comparing counts with level * count, so that e.g. 7 accepted of 10
# counts as coverage 0.7 although 0.7 * 10 == 7.000000000000001 in floating point.
LEVEL_TOL = 1e-9

RISK_AT_COVERAGES: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
COVERAGE_AT_RISKS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)


@dataclass(frozen=True)
class RiskCoverageCurve:
    """One point per distinct confidence, ordered by decreasing threshold (increasing coverage).

    Point g accepts every sample with confidence >= ``thresholds[g]``.
    """

    thresholds: np.ndarray
    coverages: np.ndarray
    selective_risks: np.ndarray
    generalized_risks: np.ndarray
    accepted: np.ndarray
    accepted_errors: np.ndarray
    n: int


def _check_pair(confidence, residuals) -> tuple[np.ndarray, np.ndarray]:
    conf = as_scores(confidence, "confidence")
    res = as_scores(residuals, "residuals", n=conf.shape[0])
    if np.any(res < 0) or np.any(res > 1):
        raise ValueError("residuals must lie in [0, 1] (1 = wrong prediction)")
    return conf, res


def risk_coverage_curve(confidence, residuals) -> RiskCoverageCurve:
    """Risk-coverage curve of ``confidence`` for per-sample ``residuals``; ties leave together."""
    conf, res = _check_pair(confidence, residuals)
    values, inverse = np.unique(-conf, return_inverse=True)  # ascending -conf = descending conf
    group_n = np.bincount(inverse, minlength=values.shape[0]).astype(np.float64)
    group_err = np.bincount(inverse, weights=res, minlength=values.shape[0])
    accepted = np.cumsum(group_n)
    errors = np.cumsum(group_err)
    n = conf.shape[0]
    return RiskCoverageCurve(
        thresholds=-values,
        coverages=accepted / n,
        selective_risks=errors / accepted,
        generalized_risks=errors / n,
        accepted=accepted,
        accepted_errors=errors,
        n=n,
    )


def _check_level(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def risk_at_coverage(confidence, residuals, coverage: float) -> float:
    """Selective risk at the first curve point whose coverage reaches ``coverage``.

    Tied confidences cannot be split, so the point used may cover a little more than asked.
    """
    _check_level(coverage, "coverage")
    return _risk_at_coverage(risk_coverage_curve(confidence, residuals), coverage)


def _risk_at_coverage(curve: RiskCoverageCurve, coverage: float) -> float:
    g = int(np.count_nonzero(curve.accepted < (coverage - LEVEL_TOL) * curve.n))
    return float(curve.selective_risks[min(g, curve.accepted.shape[0] - 1)])


def coverage_at_risk(confidence, residuals, risk: float) -> float:
    """Largest coverage among curve points with selective risk <= ``risk`` (0.0 when none)."""
    _check_level(risk, "risk")
    return _coverage_at_risk(risk_coverage_curve(confidence, residuals), risk)


def _coverage_at_risk(curve: RiskCoverageCurve, risk: float) -> float:
    ok = curve.accepted_errors <= (risk + LEVEL_TOL) * curve.accepted
    return float(curve.coverages[ok].max()) if ok.any() else 0.0


def aurc(confidence, residuals) -> float:
    """Area under the selective risk-coverage curve (trapezoid, raw value in [0, 1])."""
    return _aurc(risk_coverage_curve(confidence, residuals))


def _aurc(curve: RiskCoverageCurve) -> float:
    x = np.concatenate(([0.0], curve.coverages))
    y = np.concatenate(([curve.selective_risks[0]], curve.selective_risks))
    return float(np.trapezoid(y, x))


def augrc(confidence, residuals) -> float:
    """Area under the generalized risk-coverage curve (fd-shifts semantics, raw value in [0, 1]).

    For 0/1 residuals it equals ``(1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2``, AUROC_f being
    the AUROC of confidence separating correct from wrong predictions (ties count 1/2).
    """
    return _augrc(risk_coverage_curve(confidence, residuals))


def _augrc(curve: RiskCoverageCurve) -> float:
    x = np.concatenate(([0.0], curve.coverages))
    y = np.concatenate(([0.0], curve.generalized_risks))
    return float(np.trapezoid(y, x))


def selective_metrics(confidence, residuals) -> dict[str, float]:
    """AUGRC, AURC, Risk@{.5,...,.9} and Coverage@{.01,.02,.05,.1} in one dict."""
    curve = risk_coverage_curve(confidence, residuals)
    out = {"augrc": _augrc(curve), "aurc": _aurc(curve)}
    for c in RISK_AT_COVERAGES:
        out[f"risk@{c:g}"] = _risk_at_coverage(curve, c)
    for r in COVERAGE_AT_RISKS:
        out[f"coverage@{r:g}"] = _coverage_at_risk(curve, r)
    return out
