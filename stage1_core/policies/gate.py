"""Learned-gate exit policy (phase 3): exit iff calibrated gate score >= gate_threshold.

The head's gate logit z (``HeadOutput.gate``) goes through the :class:`GateCalibrator` stored in
``gateparams.json``; the sample exits when the calibrated score reaches ``gate_threshold`` and
exits with label argmax(p). ``gate_threshold = None`` (nothing was certified) exits nothing.

The threshold is certified by :func:`fit_gate_policy` with the same binomial Learn-then-Test
machinery as the softmax threshold (:func:`certify_score_threshold` on the calibrated score).

Which split the calibrator may be fitted on. LTT is valid when the ordered family of candidate
exit sets is fixed without the val_calib labels (given the val_calib scores). The chain order and
chain starts use only scores and predictions, so the question is the calibrator:

* ``"none"`` and ``"platt"`` are strictly increasing maps (Platt's slope a > 0; a = 0 makes one
  tie block, exit all or nothing). Fitted on val_calib they leave the family of sets
  {z >= c} unchanged - only the numbers naming the thresholds move - so fitting on val_calib
  keeps the certificate valid (up to float64 saturation of sigmoid(a z + b) at |a z + b| > 36).
* ``"isotonic"`` is constant on blocks whose boundaries depend on the labels it was fitted on.
  Fitted on val_calib, it merges candidates exactly where the labels disagree with the order,
  so the tested family depends on the val_calib labels and the LTT guarantee no longer holds
  as stated. Fit it on a split disjoint from val_calib (``calibrator_fit_data``, e.g.
  val_select) and certify on val_calib; :func:`fit_gate_policy` warns otherwise.

Recommendation for the pipeline: Platt on val_calib (the default), or any calibrator fitted on
val_select and certified on val_calib. The lead decides; the choice is recorded as
``calibrator_fit_split`` in ``gateparams.json``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..calibration.gate import CALIBRATOR_METHODS, GateCalibrator, gate_events
from ..calibration.threshold_sweep import (
    DEFAULT_METHOD,
    DEFAULT_N_STARTS,
    SCHEMA_VERSION,
    CertificationResult,
    certify_score_threshold,
)
from ..metrics._inputs import as_labels, as_probs
from .base import ExitPolicy

__all__ = ["GateExitPolicy", "fit_gate_policy", "gateparams_document"]


class GateExitPolicy(ExitPolicy):
    """Exit a sample when its calibrated gate score reaches the certified threshold."""

    name = "gate"
    policy_file = "gateparams.json"
    schema = "gateparams"

    def __init__(self, gate_threshold: float | None, calibrator: GateCalibrator) -> None:
        if gate_threshold is not None:
            if isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float, np.floating)):
                raise TypeError(f"gate_threshold must be a number or None, got {type(gate_threshold).__name__}")
            gate_threshold = float(gate_threshold)
            if not (math.isfinite(gate_threshold) and 0.0 <= gate_threshold <= 1.0):
                raise ValueError(f"gate_threshold must be a score in [0, 1] or None, got {gate_threshold!r}")
        if not isinstance(calibrator, GateCalibrator):
            raise TypeError(f"calibrator must be a GateCalibrator, got {type(calibrator).__name__}")
        if not calibrator.is_fitted:
            raise ValueError("the gate policy needs a fitted calibrator")
        self.gate_threshold = gate_threshold
        self.calibrator = calibrator

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateExitPolicy":
        for key in ("gate_threshold", "calibrator_type", "calibrator_params"):
            if key not in data:
                hint = " (use null to exit nothing)" if key == "gate_threshold" else ""
                raise ValueError(f"gate policy data has no {key!r}{hint}")
        calibrator = GateCalibrator.from_dict(
            {
                "method": data["calibrator_type"],
                "event": data.get("calibrator_event", "correct"),
                "params": data["calibrator_params"],
                "n_fit": data.get("calibrator_n_fit", 0),
            }
        )
        return cls(data["gate_threshold"], calibrator)

    def to_dict(self) -> dict[str, Any]:
        cal = self.calibrator.to_dict()
        return {
            "policy": self.name,
            "gate_threshold": self.gate_threshold,
            "calibrator_type": cal["method"],
            "calibrator_event": cal["event"],
            "calibrator_params": cal["params"],
            "calibrator_n_fit": cal["n_fit"],
        }

    def gate_score(self, gate_scores) -> np.ndarray:
        """Calibrated score in [0, 1] of each raw gate logit."""
        return self.calibrator.predict(gate_scores)

    def exit_mask(self, probs: np.ndarray, gate_scores: np.ndarray | None = None) -> np.ndarray:
        """``calibrated(gate_scores) >= gate_threshold``; all False when the threshold is None.

        ``gate_scores`` are the head's RAW gate logits [N] (``HeadOutput.gate``); the policy
        applies its own calibrator.
        """
        if gate_scores is None:
            raise ValueError(
                "the gate policy needs the head's raw gate logits (gate_scores): the head has no gate, "
                "or the caller did not pass HeadOutput.gate"
            )
        probs = np.asarray(probs, dtype=np.float64)
        raw = np.asarray(gate_scores, dtype=np.float64).reshape(-1)
        if raw.shape[0] != probs.shape[0]:
            raise ValueError(f"gate_scores has {raw.shape[0]} entries, probs {probs.shape[0]} rows")
        if self.gate_threshold is None or raw.shape[0] == 0:
            return np.zeros(probs.shape[0], dtype=bool)
        return self.gate_score(raw) >= self.gate_threshold

    def __repr__(self) -> str:
        return f"GateExitPolicy(gate_threshold={self.gate_threshold!r}, calibrator={self.calibrator!r})"


def fit_gate_policy(
    raw_gate_calib,
    probs_calib,
    labels_calib,
    target_fnr: float,
    delta: float,
    calibrator_method: str = "platt",
    method: str = DEFAULT_METHOD,
    n_starts: int = DEFAULT_N_STARTS,
    event: str = "correct",
    calibrator_fit_data: tuple[Any, Any, Any] | None = None,
) -> tuple[GateCalibrator, CertificationResult]:
    """Fit the gate calibrator and certify its threshold on val_calib.

    The calibrator is fitted on ``calibrator_fit_data = (raw_gate, probs, labels)`` when given (a
    split disjoint from val_calib, e.g. val_select), else on val_calib itself. The threshold is
    then certified with :func:`certify_score_threshold` on the calibrated val_calib scores with
    predictions argmax(p). Isotonic fitted on val_calib warns (see the module docstring). Build
    the policy with ``GateExitPolicy(result.exit_threshold, calibrator)``.
    """
    if calibrator_method not in CALIBRATOR_METHODS:
        raise ValueError(f"unknown gate calibrator {calibrator_method!r}; choose one of {CALIBRATOR_METHODS}")
    p = as_probs(probs_calib)
    if p.shape[1] != 2:
        raise ValueError(f"the gate exit policy is binary: probs must be [N, 2], got {p.shape}")
    y = as_labels(labels_calib, n=p.shape[0])
    raw = np.asarray(raw_gate_calib, dtype=np.float64).reshape(-1)
    if raw.shape[0] != p.shape[0]:
        raise ValueError(f"raw gate logits have {raw.shape[0]} entries, probs {p.shape[0]} rows")
    pred = p.argmax(axis=1)
    calibrator = GateCalibrator(calibrator_method, event)
    if calibrator_fit_data is None:
        if calibrator_method == "isotonic":
            warnings.warn(
                "isotonic gate calibrator fitted on val_calib: its tie blocks depend on the val_calib "
                "labels, so the certified threshold is not covered by the LTT guarantee as stated; "
                "pass calibrator_fit_data from a disjoint split (val_select)",
                UserWarning,
                stacklevel=2,
            )
        calibrator.fit(raw, gate_events(pred, y, event))
    else:
        fit_raw, fit_probs, fit_labels = calibrator_fit_data
        fp = as_probs(fit_probs)
        fy = as_labels(fit_labels, n=fp.shape[0])
        calibrator.fit(np.asarray(fit_raw, dtype=np.float64).reshape(-1), gate_events(fp.argmax(axis=1), fy, event))
    result = certify_score_threshold(calibrator.predict(raw), pred, y, target_fnr, delta, method, n_starts)
    return calibrator, result


def _softmax_summary(result: CertificationResult, coverage_at_deploy_prior: float) -> dict[str, Any]:
    return {
        "exit_threshold": result.exit_threshold,
        "certified": result.certified,
        "reason": result.reason,
        "method": result.method,
        "test_level": result.test_level,
        "coverage": result.coverage,
        "coverage_at_deploy_prior": float(coverage_at_deploy_prior),
        "fnr_on_exits": result.fnr_on_exits,
        "fnr_upper_bound": result.fnr_upper_bound,
        "exit_accuracy": result.exit_accuracy,
        "n_exited_positives": result.n_exited_positives,
        "n_false_negatives": result.n_false_negatives,
    }


def gateparams_document(
    result: CertificationResult,
    calibrator: GateCalibrator,
    checkpoint_id: str,
    deploy_prior: float,
    coverage_at_deploy_prior: float,
    softmax_result: CertificationResult,
    softmax_coverage_at_deploy_prior: float,
    val_calib_metrics: dict[str, Any] | None = None,
    calibrator_fit_split: str = "val_calib",
) -> dict[str, Any]:
    """The ``gateparams.json`` content (schema ``gateparams``).

    ``result`` is the gate certificate from :func:`fit_gate_policy`; ``softmax_result`` the
    softmax certificate on the same checkpoint and val_calib, reported under ``softmax_comparison``
    with ``coverage_gain_vs_softmax`` = gate coverage - softmax coverage (calibration prior).
    Coverage at the deployment prior is computed by the caller
    (:func:`stage1_core.metrics.exit.coverage_at_prior` on each policy's val_calib exit mask).
    """
    if not checkpoint_id:
        raise ValueError("checkpoint_id must name the checkpoint the gate policy was fit for")
    if not 0.0 <= deploy_prior <= 1.0:
        raise ValueError(f"deploy_prior must lie in [0, 1], got {deploy_prior!r}")
    if not calibrator_fit_split:
        raise ValueError("calibrator_fit_split must name the split the calibrator was fitted on")
    if softmax_result.n_calib != result.n_calib:
        raise ValueError(
            f"the softmax comparison was certified on {softmax_result.n_calib} samples, the gate on "
            f"{result.n_calib}: compare both on the same val_calib"
        )
    cal = calibrator.to_dict()
    return {
        "schema_version": SCHEMA_VERSION,
        "policy": GateExitPolicy.name,
        "checkpoint_id": checkpoint_id,
        "gate_threshold": result.exit_threshold,
        "calibrator_type": cal["method"],
        "calibrator_event": cal["event"],
        "calibrator_params": cal["params"],
        "calibrator_n_fit": cal["n_fit"],
        "calibrator_fit_split": calibrator_fit_split,
        **result.certificate_fields(),
        "coverage_at_deploy_prior": float(coverage_at_deploy_prior),
        "deploy_prior": float(deploy_prior),
        "softmax_comparison": _softmax_summary(softmax_result, softmax_coverage_at_deploy_prior),
        "coverage_gain_vs_softmax": result.coverage - softmax_result.coverage,
        "sweep_results": result.sweep_results,
        "val_calib_metrics": dict(val_calib_metrics or {}),
    }
