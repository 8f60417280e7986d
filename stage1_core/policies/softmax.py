"""Softmax exit policy (phase 1): exit iff max(p) >= exit_threshold, from ``thresholds.json``.

For two classes ``max(p) >= t`` is ``p1 >= t or p1 <= 1 - t``. ``exit_threshold = None`` (nothing
was certified) exits nothing; there is no default threshold. :meth:`SoftmaxExitPolicy.fit`
certifies the threshold on val_calib (:func:`~stage1_core.calibration.threshold_sweep.certify_softmax_threshold`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..calibration.threshold_sweep import certify_softmax_threshold, thresholds_document
from ..metrics.exit import coverage_at_prior
from .base import ExitPolicy, FitInputs, FittedPolicy, calib_metrics
from .registry import register_policy

__all__ = ["SoftmaxExitPolicy"]


@register_policy
class SoftmaxExitPolicy(ExitPolicy):
    """Exit a sample when its top softmax probability reaches the certified threshold."""

    name = "softmax"
    policy_file = "thresholds.json"
    schema = "thresholds"
    exit_rule = "its larger softmax probability (roadwork or no roadwork) is at least t"

    def __init__(self, exit_threshold: float | None):
        if exit_threshold is not None:
            if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float, np.floating)):
                raise TypeError(f"exit_threshold must be a number or None, got {type(exit_threshold).__name__}")
            exit_threshold = float(exit_threshold)
            if not (math.isfinite(exit_threshold) and 0.0 <= exit_threshold <= 1.0):
                raise ValueError(f"exit_threshold must be a probability in [0, 1] or None, got {exit_threshold!r}")
        self.exit_threshold = exit_threshold

    @classmethod
    def fit(cls, inputs: FitInputs) -> FittedPolicy:
        """Certify exit iff max(p) >= t on val_calib (never a default threshold)."""
        from ..reporting.figures import plot_threshold_sweep  # matplotlib

        cfg, calib = inputs.cfg, inputs.take("calibrate")
        probs, labels = calib.probs, calib.labels
        result = certify_softmax_threshold(probs, labels, cfg.target_fnr_exit, cfg.delta)
        decisions = cls(result.exit_threshold).decide(probs)
        doc = thresholds_document(
            result,
            val_calib_metrics=calib_metrics(probs, labels),
            checkpoint_id=inputs.checkpoint_id,
            deploy_prior=cfg.deploy_prior,
            coverage_at_deploy_prior=float(coverage_at_prior(decisions.exit, labels, cfg.deploy_prior)),
        )
        figure = plot_threshold_sweep(result, cfg.target_fnr_exit, inputs.out_dir / "threshold_sweep.png")
        metadata = {
            "certified": bool(result.certified), "exit_threshold": result.exit_threshold,
            "coverage": float(result.coverage), "fnr_upper_bound": float(result.fnr_upper_bound),
            "n_exited_positives": int(result.n_exited_positives), "method": result.method,
            "reason": result.reason, "coverage_at_deploy_prior": doc["coverage_at_deploy_prior"],
        }
        return FittedPolicy(doc, metadata, {"threshold sweep (val_calib)": figure},
                            {"seed_grid": list(doc["grid_results"])})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SoftmaxExitPolicy":
        if "exit_threshold" not in data:
            raise ValueError("softmax policy data has no 'exit_threshold' (use null to exit nothing)")
        return cls(data["exit_threshold"])

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "exit_threshold": self.exit_threshold}

    def exit_mask(self, probs: np.ndarray, gate_scores: np.ndarray | None = None) -> np.ndarray:
        """``max(p) >= exit_threshold`` per row; all False when the threshold is None.

        ``gate_scores`` are not used by this policy.
        """
        probs = np.asarray(probs, dtype=np.float64)
        if self.exit_threshold is None:
            return np.zeros(probs.shape[0], dtype=bool)
        return probs.max(axis=1) >= self.exit_threshold

    def __repr__(self) -> str:
        return f"SoftmaxExitPolicy(exit_threshold={self.exit_threshold!r})"
