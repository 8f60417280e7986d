"""Phase 3: the gated head trains, its gate policy beats the softmax policy, no classification regression, calibrated gate.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.gates import ACCURACY_TOLERANCE, GateVerdict
from stage1_core.store import read_training

from .compare import compare
from .readers import evaluation_record, training_record
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("gate_trains", "checkpoint",
        "the gate head trains: finite losses, gate scores on val_select spread out (not collapsed) and "
        "the gate separates correct from wrong predictions (AUROC > 0.5)")

declare("gate_beats_softmax", "evaluation",
        "on val_test the certified gate policy exits more than the certified softmax policy fit on the "
        "same checkpoint's val_calib logits, by more than gate_min_gain (paired bootstrap CI reported)")

declare("no_classification_regression", "evaluation",
        "cls accuracy on val_select not lower than the previous phase's by more than 1 point; exit "
        "accuracy of the gate policy not lower than the softmax policy's by more than 1 point")

declare("gate_calibration_improves", "evaluation",
        "on val_test the calibrated gate score has ECE and Brier <= those of the raw sigmoid")


# ----- rules (pure) ---------------------------------------------------------------------


def check_gate_trains(
    losses_finite: bool, gate_scores: np.ndarray, correct: np.ndarray, min_spread: float = 0.01
) -> GateVerdict:
    """The gate head trained: finite losses, scores not collapsed (std >= min_spread), AUROC > 0.5."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(gate_scores, dtype=float)
    correct = np.asarray(correct).astype(int)
    spread = float(scores.std()) if scores.size else 0.0
    auroc = float(roc_auc_score(correct, scores)) if 0 < correct.sum() < correct.size else None
    problems = []
    if not losses_finite:
        problems.append("a training loss was not finite")
    if spread < min_spread:
        problems.append(f"the gate collapsed: its val_select scores have std {spread:.4g} < {min_spread}")
    if auroc is None:
        problems.append("val_select has no wrong (or no correct) prediction, so the gate's AUROC is undefined")
    elif auroc <= 0.5:
        problems.append(f"the gate does not separate correct from wrong predictions (AUROC {auroc:.4f} <= 0.5)")
    message = "; ".join(problems) or f"gate scores spread (std {spread:.4f}), AUROC for 'correct' {auroc:.4f}"
    return GateVerdict("gate_trains", not problems, message,
                       {"losses_finite": bool(losses_finite), "gate_score_std": spread, "gate_auroc": auroc,
                        "min_spread": min_spread})


def check_gate_beats_softmax(gate_coverage: float, softmax_coverage: float, ci: Mapping[str, float],
                             min_gain: float = 0.0) -> GateVerdict:
    """On val_test the certified gate policy's coverage exceeds the softmax policy's by > ``min_gain``."""
    gain = gate_coverage - softmax_coverage
    passed = gain > min_gain
    message = (
        f"val_test coverage gate {gate_coverage:.4f} vs softmax {softmax_coverage:.4f}: gain {gain:+.4f} "
        f"(paired bootstrap CI [{ci['ci_lower']:+.4f}, {ci['ci_upper']:+.4f}]), needs > {min_gain:+.4f}"
    )
    return GateVerdict("gate_beats_softmax", passed, message,
                       {"gate_coverage": gate_coverage, "softmax_coverage": softmax_coverage, "gain": gain,
                        "gain_ci_lower": ci["ci_lower"], "gain_ci_upper": ci["ci_upper"], "min_gain": min_gain})


def check_no_classification_regression(
    accuracy: float, previous_accuracy: float, previous_phase: str, gate_exit_accuracy: float | None,
    softmax_exit_accuracy: float | None, tolerance: float = ACCURACY_TOLERANCE,
    exit_accuracy_ci: Mapping[str, float] | None = None, rule: str = "confirm",
) -> GateVerdict:
    """cls accuracy within 1 point of the previous phase; gate exit accuracy within 1 point of softmax's.

    The exit-accuracy clause compares two policies on the same val_test images. With ``rule``
    "confirm" and ``exit_accuracy_ci`` (the paired bootstrap CI of gate minus softmax exit
    accuracy) it is a confirmation test, like the val_test FNR criterion: it fails when the whole
    CI lies below ``-tolerance`` (significant evidence of a loss larger than the tolerance). With
    ``rule`` "point", or without a CI, it compares the point estimates. The point estimate and
    the CI (when given) are always reported.
    """
    if rule not in ("confirm", "point"):
        raise ValueError(f"rule must be 'confirm' or 'point', got {rule!r}")
    problems = []
    if not compare(accuracy, previous_accuracy, margin=tolerance).passed:
        problems.append(f"val_select accuracy {accuracy:.4f} is more than {tolerance} below {previous_phase}'s "
                        f"{previous_accuracy:.4f}")
    figures: dict[str, Any] = {"accuracy": accuracy, "previous_accuracy": previous_accuracy,
                               "previous_phase": previous_phase, "gate_exit_accuracy": gate_exit_accuracy,
                               "softmax_exit_accuracy": softmax_exit_accuracy, "tolerance": tolerance,
                               "exit_accuracy_rule": rule}
    detail = ""
    if gate_exit_accuracy is None:
        problems.append("the gate policy exits nothing on val_test, so its exit accuracy is undefined")
    elif softmax_exit_accuracy is not None:
        difference = gate_exit_accuracy - softmax_exit_accuracy
        figures["exit_accuracy_difference"] = difference
        if exit_accuracy_ci is not None:
            lower, upper = float(exit_accuracy_ci["ci_lower"]), float(exit_accuracy_ci["ci_upper"])
            figures.update(exit_accuracy_difference_ci_lower=lower, exit_accuracy_difference_ci_upper=upper)
            detail = f" (difference {difference:+.4f}, paired bootstrap CI [{lower:+.4f}, {upper:+.4f}])"
        if exit_accuracy_ci is not None and rule == "confirm":
            if not upper >= -tolerance - 1e-12:
                problems.append(f"gate exit accuracy {gate_exit_accuracy:.4f} is significantly more than {tolerance} "
                                f"below the softmax policy's {softmax_exit_accuracy:.4f}{detail}")
        elif -difference > tolerance + 1e-12:
            problems.append(f"gate exit accuracy {gate_exit_accuracy:.4f} is more than {tolerance} below the softmax "
                            f"policy's {softmax_exit_accuracy:.4f}{detail}")
    message = "; ".join(problems) or (
        f"val_select accuracy {accuracy:.4f} ({previous_phase} {previous_accuracy:.4f}); exit accuracy gate "
        f"{gate_exit_accuracy:.4f} vs softmax "
        f"{softmax_exit_accuracy if softmax_exit_accuracy is not None else float('nan'):.4f}{detail}"
    )
    return GateVerdict("no_classification_regression", not problems, message, figures)


def check_gate_calibration_improves(calibration: Mapping[str, float]) -> GateVerdict:
    """Calibrated gate ECE and Brier on val_test are no worse than the raw sigmoid's."""
    ece_ok = calibration["ece_calibrated"] <= calibration["ece_raw_sigmoid"] + 1e-12
    brier_ok = calibration["brier_calibrated"] <= calibration["brier_raw_sigmoid"] + 1e-12
    message = (
        f"ECE {calibration['ece_calibrated']:.4f} (raw {calibration['ece_raw_sigmoid']:.4f}), Brier "
        f"{calibration['brier_calibrated']:.4f} (raw {calibration['brier_raw_sigmoid']:.4f}) for event "
        f"'{calibration.get('event')}'"
    )
    return GateVerdict("gate_calibration_improves", ece_ok and brier_ok,
                       message if ece_ok and brier_ok else "calibration made the gate worse: " + message,
                       dict(calibration))


# ----- readers ---------------------------------------------------------------------------


def _gate_comparison(ctx: StepContext) -> dict[str, Any]:
    comparison = evaluation_record(ctx).get("gate_comparison")
    if comparison is None:
        raise ValueError(f"evaluation[{ctx.partition}] holds no gate comparison (is its policy the gate policy?)")
    return comparison


@reader("gate_trains")
def _gate_trains(ctx: StepContext) -> GateVerdict:
    """Judged on the checkpoint itself (predictions do not exist yet when checkpoint checks run)."""
    from scipy import special

    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.policies import SoftmaxExitPolicy
    from stage1_core.steps.backbone import load_split
    from stage1_core.steps.training import load_head

    training = training_record(ctx)
    data = load_split(ctx.layout, ctx.partition, "val_select")
    predictor = Stage1Predictor(load_head(ctx.layout, ctx.partition), SoftmaxExitPolicy(None))
    logits, raw = predictor.head_outputs_from_features(data.features)
    if raw is None:
        return GateVerdict("gate_trains", False, "the checkpoint has no gate head", {})
    correct = logits.argmax(1) == data.labels.numpy()
    return check_gate_trains(bool(training["losses_finite"]), special.expit(raw), correct)


@reader("gate_beats_softmax")
def _gate_beats_softmax(ctx: StepContext) -> GateVerdict:
    c = _gate_comparison(ctx)
    return check_gate_beats_softmax(c["gate"]["coverage"], c["softmax"]["coverage"], c["coverage_gain"],
                                          float(ctx.cfg.gate_min_gain))


@reader("no_classification_regression")
def _no_classification_regression(ctx: StepContext) -> GateVerdict:
    c = _gate_comparison(ctx)
    previous = ctx.reference_phase()
    if previous is None:
        return GateVerdict("no_classification_regression", False, "no earlier phase to compare with", {})
    current = read_training(ctx.layout, ctx.partition)["best_val_accuracy"]
    before = read_training(ctx.layout, previous)["best_val_accuracy"]
    return check_no_classification_regression(current, before, previous, c["gate"]["exit_accuracy"],
                                                    c["softmax"]["exit_accuracy"],
                                                    exit_accuracy_ci=c.get("exit_accuracy_difference"),
                                                    rule=ctx.cfg.exit_accuracy_check)


@reader("gate_calibration_improves")
def _gate_calibration_improves(ctx: StepContext) -> GateVerdict:
    return check_gate_calibration_improves(_gate_comparison(ctx)["calibration"])
