"""Softmax exit policy (phase 1): exit iff max(p) >= exit_threshold, from ``thresholds.json``.

For two classes ``max(p) >= t`` is ``p1 >= t or p1 <= 1 - t``. ``exit_threshold = None`` (nothing
was certified) exits nothing; there is no default threshold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import ExitPolicy

__all__ = ["SoftmaxExitPolicy"]


class SoftmaxExitPolicy(ExitPolicy):
    """Exit a sample when its top softmax probability reaches the certified threshold."""

    name = "softmax"
    policy_file = "thresholds.json"
    schema = "thresholds"

    def __init__(self, exit_threshold: float | None):
        if exit_threshold is not None:
            if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float, np.floating)):
                raise TypeError(f"exit_threshold must be a number or None, got {type(exit_threshold).__name__}")
            exit_threshold = float(exit_threshold)
            if not (math.isfinite(exit_threshold) and 0.0 <= exit_threshold <= 1.0):
                raise ValueError(f"exit_threshold must be a probability in [0, 1] or None, got {exit_threshold!r}")
        self.exit_threshold = exit_threshold

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
