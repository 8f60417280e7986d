"""Metrics: calibration (ECE, NLL, Brier), exit policy, classification, selective prediction,
and a vectorised bootstrap for all of them (``stage1_core.metrics.bootstrap``)."""

from __future__ import annotations

from .bootstrap import BootstrapResult
from .calibration import classwise_ece, compute_brier, compute_ece, compute_nll
from .classification import accuracy, balanced_accuracy, mcc
from .exit import ExitMetrics, coverage_at_prior, exit_metrics
from .selective import (
    aurc,
    augrc,
    coverage_at_risk,
    risk_at_coverage,
    risk_coverage_curve,
    selective_metrics,
)

__all__ = [
    "BootstrapResult",
    "ExitMetrics",
    "accuracy",
    "aurc",
    "augrc",
    "balanced_accuracy",
    "classwise_ece",
    "compute_brier",
    "compute_ece",
    "compute_nll",
    "coverage_at_prior",
    "coverage_at_risk",
    "exit_metrics",
    "mcc",
    "risk_at_coverage",
    "risk_coverage_curve",
    "selective_metrics",
]
