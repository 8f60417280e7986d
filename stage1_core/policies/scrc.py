"""SCRC exit policy (phase 6), from ``scrcparams.json``.

A sample exits iff ``g >= lambda1`` and its set ``C(x) = {y : q_y >= 1 - lambda2}`` is a singleton
(:mod:`stage1_core.calibration.scrc`). Both calibrations travel inside the policy file as plain
numbers, so the policy needs nothing else:

* ``q = calibrator(p)``: a Dirichlet calibrator (``{"method": "dirichlet", "W", "b", ...}``) or
  the identity (``{"method": "none"}``), applied to the raw softmax probabilities ``p``;
* ``g = gate_calibrator(z)`` on the RAW gate logit ``z``
  (:func:`~stage1_core.calibration.scrc.apply_gate_calibration`): ``"platt"``
  ``sigmoid(a * z + b)``, ``"isotonic"`` ``interp(z, x, y)`` (or of ``sigmoid(z)`` with
  ``"input": "sigmoid"``), ``"none"`` ``sigmoid(z)``. ``GateCalibrator.to_dict()`` output
  (:mod:`stage1_core.calibration.gate`) is accepted too and stored in the flat form.

``gate_scores`` are therefore required (ValueError without them). ``lambda1 = lambda2 = None``
(nothing certified) exits nothing. :meth:`SCRCExitPolicy.decide` answers with the calibrated
argmax and reports ``p_roadwork = q_1``; deferred samples get the set (0, 1) in
``prediction_sets``, and :class:`SCRCDecisions` adds the stage-2 set itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..calibration.dirichlet import DirichletCalibrator
from ..calibration.scrc import _finite, apply_gate_calibration, check_gate_calibrator, scrc_exits
from ..metrics._inputs import as_probs
from .base import DEFERRED_SET, Decisions, ExitPolicy

__all__ = ["SCRCExitPolicy", "SCRCDecisions", "apply_gate_calibration", "check_gate_calibrator"]


def _class_calibrator(spec: dict[str, Any]) -> DirichletCalibrator | None:
    if not isinstance(spec, dict):
        raise TypeError(f"calibrator must be a dict, got {type(spec).__name__}")
    if spec.get("method") == "none":
        return None
    if spec.get("method") == "dirichlet":
        cal = DirichletCalibrator.from_dict(spec)
        if cal.coef_.shape != (2, 2):
            raise ValueError(f"the SCRC policy is binary: Dirichlet W must be [2, 2], got {cal.coef_.shape}")
        return cal
    raise ValueError(f"unknown class calibrator {spec.get('method')!r}; use 'dirichlet' or 'none'")


@dataclass(frozen=True)
class SCRCDecisions(Decisions):
    """:class:`Decisions` plus the SCRC internals per sample.

    ``scrc_sets``: the stage-2 set ``C(x)`` of selected samples (may be (0, 1) or () when
    deferred), None for samples stage 1 did not select; ``selected``: the stage-1 mask;
    ``gate_score``: the calibrated gate score ``g``.
    """

    scrc_sets: list[tuple[int, ...] | None] = field(default_factory=list)
    selected: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    gate_score: np.ndarray = field(default_factory=lambda: np.zeros(0))


class SCRCExitPolicy(ExitPolicy):
    """Exit when the calibrated gate selects a sample and its conformal set is a singleton."""

    name = "scrc"
    policy_file = "scrcparams.json"
    schema = "scrcparams"

    def __init__(
        self,
        lambda1: float | None,
        lambda2: float | None,
        calibrator: dict[str, Any] | None = None,
        gate_calibrator: dict[str, Any] | None = None,
    ):
        if (lambda1 is None) != (lambda2 is None):
            raise ValueError("lambda1 and lambda2 must both be numbers or both be None (exit nothing)")
        if lambda1 is not None:
            lambda1 = _finite(lambda1, "lambda1")
            lambda2 = _finite(lambda2, "lambda2")
            if not 0.0 <= lambda2 <= 1.0:
                raise ValueError(f"lambda2 must lie in [0, 1], got {lambda2!r}")
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.calibrator = dict(calibrator) if calibrator is not None else {"method": "none"}
        self.gate_calibrator = check_gate_calibrator(gate_calibrator if gate_calibrator is not None else {"method": "none"})
        self._dirichlet = _class_calibrator(self.calibrator)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SCRCExitPolicy":
        missing = [k for k in ("lambda1", "lambda2", "calibrator", "gate_calibrator") if k not in data]
        if missing:
            raise ValueError(f"scrc policy data lacks {missing} (use null thresholds to exit nothing)")
        return cls(data["lambda1"], data["lambda2"], data["calibrator"], data["gate_calibrator"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "calibrator": dict(self.calibrator),
            "gate_calibrator": dict(self.gate_calibrator),
        }

    def calibrated(self, probs, gate_scores) -> tuple[np.ndarray, np.ndarray]:
        """``(q, g)``: calibrated probabilities [N, 2] and calibrated gate scores [N]."""
        if gate_scores is None:
            raise ValueError("the scrc policy needs gate_scores (the raw gate logits of the head), got None")
        p = as_probs(probs, allow_empty=True)
        if p.shape[1] != 2:
            raise ValueError(f"the scrc policy is binary: probs must be [N, 2], got {p.shape}")
        z = np.asarray(gate_scores, dtype=np.float64).reshape(-1)
        if z.shape[0] != p.shape[0]:
            raise ValueError(f"gate_scores has {z.shape[0]} entries, probs {p.shape[0]} rows")
        q = p if self._dirichlet is None else self._dirichlet.predict_proba(p)
        return q, apply_gate_calibration(z, self.gate_calibrator)

    def exit_mask(self, probs: np.ndarray, gate_scores: np.ndarray | None = None) -> np.ndarray:
        """Selected by the calibrated gate and a singleton set; ValueError without ``gate_scores``."""
        q, g = self.calibrated(probs, gate_scores)
        return scrc_exits(g, q, self.lambda1, self.lambda2)[0]

    def decide(self, probs, gate_scores=None) -> SCRCDecisions:
        """Decisions with the calibrated answer; ``scrc_sets`` holds the stage-2 sets."""
        q, g = self.calibrated(probs, gate_scores)
        exits, answer, sets = scrc_exits(g, q, self.lambda1, self.lambda2)
        selected = np.zeros(q.shape[0], dtype=bool) if self.lambda1 is None else g >= self.lambda1
        scrc_sets = [tuple(int(c) for c in np.flatnonzero(row)) if s else None for row, s in zip(sets, selected)]
        pred_sets = [(int(a),) if e else DEFERRED_SET for e, a in zip(exits, answer)]
        return SCRCDecisions(
            exit=exits,
            label=answer.astype(np.int64),
            p_roadwork=q[:, 1].copy(),
            prediction_sets=pred_sets,
            scrc_sets=scrc_sets,
            selected=selected,
            gate_score=g,
        )

    def __repr__(self) -> str:
        return (
            f"SCRCExitPolicy(lambda1={self.lambda1!r}, lambda2={self.lambda2!r}, "
            f"calibrator={self.calibrator.get('method')!r}, gate_calibrator={self.gate_calibrator['method']!r})"
        )
