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
from pathlib import Path
from typing import Any

import numpy as np

from scipy import special

from ..calibration.gate import (
    CALIBRATOR_METHODS,
    GateCalibrator,
    gate_auroc,
    gate_calibration_metrics,
    gate_events,
    score_ece,
)
from ..calibration.threshold_sweep import (
    DEFAULT_METHOD,
    DEFAULT_N_STARTS,
    SCHEMA_VERSION,
    CertificationResult,
    certify_score_threshold,
    certify_softmax_threshold,
)
from ..metrics._inputs import as_labels, as_probs
from ..metrics.exit import coverage_at_prior
from ..metrics.paired import (
    brier,
    exit_summary,
    paired_bootstrap_difference,
    paired_bootstrap_ece_difference,
    paired_bootstrap_exit_accuracy_difference,
)
from .base import ExitPolicy, FitInputs, FittedPolicy, calib_metrics
from .registry import register_policy
from .softmax import SoftmaxExitPolicy

__all__ = ["GateExitPolicy", "fit_gate_policy", "gateparams_document"]



def top_k_exits(scores: np.ndarray, tie_break: np.ndarray, k: int) -> np.ndarray:
    """Exit mask of the ``k`` images ranked highest by ``scores`` (ties broken by ``tie_break``)."""
    order = np.lexsort((-np.asarray(tie_break, dtype=float), -np.asarray(scores, dtype=float)))
    mask = np.zeros(len(order), dtype=bool)
    mask[order[:max(0, min(int(k), len(order)))]] = True
    return mask

@register_policy
class GateExitPolicy(ExitPolicy):
    """Exit a sample when its calibrated gate score reaches the certified threshold."""

    name = "gate"
    policy_file = "gateparams.json"
    schema = "gateparams"
    threshold_key = "gate_threshold"
    exit_rule = "its calibrated gate score (the head's estimate that its prediction is right) is at least t"

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
    def fit_splits(cls, cfg: Any) -> tuple[str, ...]:
        """val_calib, and val_select for an isotonic calibrator (see the module docstring)."""
        return ("val_calib", "val_select") if cfg.gate_calibration == "isotonic" else ("val_calib",)

    @classmethod
    def fit(cls, inputs: FitInputs) -> FittedPolicy:
        """Calibrate the gate score and certify exit iff calibrated score >= t on val_calib.

        The calibrator (``gate_calibration``) is fitted on val_select for isotonic (its tie blocks
        depend on the labels it sees, so fitting them on val_calib would let val_calib's labels shape
        the tested family) and on val_calib for Platt (a strictly increasing map leaves the family of
        candidate exit sets unchanged). The softmax policy is certified on the same checkpoint's
        val_calib logits for comparison.
        """
        from ..reporting.figures import plot_threshold_sweep  # matplotlib

        cfg, calib = inputs.cfg, inputs.take("calibrate")
        probs, raw, labels = calib.probs, calib.gate_logits, calib.labels
        if raw is None:
            raise ValueError("the checkpoint has no gate head, so the gate policy cannot be fitted")
        fit_split = "val_select" if cfg.gate_calibration == "isotonic" else "val_calib"
        fit_data = None
        if fit_split == "val_select":
            sel = inputs.take("select")
            fit_data = (sel.gate_logits, sel.probs, sel.labels)
        calibrator, result = fit_gate_policy(raw, probs, labels, cfg.target_fnr_exit, cfg.delta,
                                             calibrator_method=cfg.gate_calibration, calibrator_fit_data=fit_data)
        softmax = certify_softmax_threshold(probs, labels, cfg.target_fnr_exit, cfg.delta)
        gate_exits = cls(result.exit_threshold, calibrator).decide(probs, gate_scores=raw).exit
        soft_exits = SoftmaxExitPolicy(softmax.exit_threshold).decide(probs).exit
        doc = gateparams_document(
            result, calibrator, inputs.checkpoint_id, cfg.deploy_prior,
            float(coverage_at_prior(gate_exits, labels, cfg.deploy_prior)), softmax,
            float(coverage_at_prior(soft_exits, labels, cfg.deploy_prior)),
            val_calib_metrics={**calib_metrics(probs, labels),
                               **gate_calibration_metrics(raw, calibrator, probs.argmax(1), labels)},
            calibrator_fit_split=fit_split,
        )
        figure = plot_threshold_sweep(result, cfg.target_fnr_exit, inputs.out_dir / "threshold_sweep.png")
        metadata = {
            "certified": bool(result.certified), "gate_threshold": result.exit_threshold,
            "coverage": float(result.coverage), "fnr_upper_bound": float(result.fnr_upper_bound),
            "n_exited_positives": int(result.n_exited_positives), "method": result.method, "reason": result.reason,
            "calibrator": cfg.gate_calibration, "calibrator_fit_split": fit_split,
            "softmax_coverage": float(softmax.coverage), "coverage_gain_vs_softmax": doc["coverage_gain_vs_softmax"],
        }
        return FittedPolicy(doc, metadata, {"gate threshold sweep (val_calib)": figure})

    @classmethod
    def evaluation_extras(cls, certificate: dict[str, Any], probs: np.ndarray, gate_logits: np.ndarray | None,
                          decisions: Any, labels: np.ndarray, cfg: Any, out_dir: Path,
                          ) -> tuple[dict[str, Any], dict[str, Path]]:
        """``gate_comparison``: the certified gate and softmax policies side by side on val_test.

        Coverage, exit accuracy and FNR on exits of both, paired bootstrap CIs of the coverage and
        exit-accuracy differences, and the gate calibration (ECE and Brier of the raw sigmoid vs the
        calibrated score for the calibrator's event), with the figures a person compares.
        """
        from ..reporting.exit_figures import plot_fnr_coverage, plot_score_histograms  # matplotlib
        from ..reporting.figures import plot_reliability

        raw_gate = gate_logits
        gate_exits = np.asarray(decisions.exit, dtype=bool)
        preds = probs.argmax(1)
        calibrator = GateCalibrator.from_dict({"method": certificate["calibrator_type"],
                                               "event": certificate["calibrator_event"],
                                               "params": certificate["calibrator_params"],
                                               "n_fit": certificate["calibrator_n_fit"]})
        calibrated = calibrator.predict(raw_gate)
        raw_sigmoid = special.expit(raw_gate)
        events = gate_events(preds, labels, calibrator.event).astype(float)
        soft_exits = SoftmaxExitPolicy(certificate["softmax_comparison"]["exit_threshold"]).decide(probs).exit
        gate = exit_summary(gate_exits, preds, labels)
        softmax = exit_summary(soft_exits, preds, labels)
        diff = paired_bootstrap_difference(gate_exits, soft_exits, cfg.bootstrap_samples, cfg.bootstrap_confidence,
                                           cfg.seed)
        # Exit accuracy is compared at the softmax policy's coverage: the gate's same number of most
        # confident images (its deployed ranking, raw logit breaking ties) against softmax's exits.
        # At the two policies' own operating points the gate exits more, harder images, which would
        # charge its extra coverage to its ranking (on data seed 1001: -0.8 points at its operating
        # point, +0.4 at matched coverage); that difference is reported beside it.
        matched = top_k_exits(calibrated, raw_gate, int(soft_exits.sum()))
        gate_at_softmax_coverage = exit_summary(matched, preds, labels)
        bootstrap = (cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
        accuracy_diff = {**paired_bootstrap_exit_accuracy_difference(preds == labels, matched, soft_exits, *bootstrap),
                         "at": "the softmax policy's coverage"}
        accuracy_diff_operating = paired_bootstrap_exit_accuracy_difference(preds == labels, gate_exits, soft_exits,
                                                                            *bootstrap)
        calibration = {
            "event": calibrator.event,
            "ece_raw_sigmoid": score_ece(raw_sigmoid, events), "ece_calibrated": score_ece(calibrated, events),
            "brier_raw_sigmoid": brier(raw_sigmoid, events), "brier_calibrated": brier(calibrated, events),
            "gate_auroc": gate_auroc(raw_gate, events),
            # Paired per image: calibrated minus raw (lower is better), the evidence of gate_calibration_works.
            "brier_difference": {**paired_bootstrap_difference((calibrated - events) ** 2, (raw_sigmoid - events) ** 2,
                                                               *bootstrap), "n": int(events.size)},
            "ece_difference": paired_bootstrap_ece_difference(calibrated, raw_sigmoid, events, *bootstrap),
        }
        figures = {
            "FNR on exits vs coverage, gate and softmax (val_test)": plot_fnr_coverage(
                {"softmax max(p)": (probs.max(1), preds), "calibrated gate": (calibrated, preds)}, labels,
                float(certificate["target_fnr"]), out_dir / "gate_vs_softmax.png",
                operating={"softmax max(p)": softmax["coverage"], "calibrated gate": gate["coverage"]}),
            "gate reliability (val_test)": plot_reliability(np.stack([1 - calibrated, calibrated], 1),
                                                            events.astype(int), out_dir / "gate_reliability.png",
                                                            title="Calibrated gate reliability (val_test)"),
            "gate score by outcome (val_test)": plot_score_histograms(calibrated, preds, labels,
                                                                      out_dir / "gate_histograms.png",
                                                                      threshold=certificate["gate_threshold"]),
        }
        comparison = {"gate": gate, "softmax": softmax, "gate_at_softmax_coverage": gate_at_softmax_coverage,
                      "coverage_gain": diff, "exit_accuracy_difference": accuracy_diff,
                      "exit_accuracy_difference_at_operating_points": accuracy_diff_operating,
                      "calibration": calibration}
        return {"gate_comparison": comparison}, figures

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
