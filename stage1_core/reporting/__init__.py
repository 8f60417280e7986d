"""Report figures (PNG, matplotlib Agg): risk-coverage, reliability, threshold sweep."""

from __future__ import annotations

from .figures import plot_reliability, plot_risk_coverage, plot_threshold_sweep

__all__ = ["plot_reliability", "plot_risk_coverage", "plot_threshold_sweep"]
