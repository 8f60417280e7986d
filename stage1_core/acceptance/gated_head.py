"""Phase 3: the gated head trains, its gate policy beats the softmax policy, no classification regression, calibrated gate.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.gates import GateVerdict
from stage1_core.store import read_training

from .compare import SLACK, compare, paired_compare, paired_verdict
from .readers import bootstrap_settings, evaluation_record, paired_val_test, training_record
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("gate_trains", "checkpoint",
        "the gate head trains: finite losses, gate scores on val_select spread out (not collapsed) and "
        "the gate separates correct from wrong predictions (AUROC > 0.5)")

declare("gate_beats_softmax", "evaluation",
        "superiority on val_test: the certified gate policy exits more images than the certified softmax "
        "policy fit on the same checkpoint's val_calib logits; passes only when the paired bootstrap CI's "
        "lower end of the coverage gain exceeds gate_min_gain (two equal policies pass with probability "
        "<= 2.5%)")

declare("no_classification_regression", "evaluation",
        "not worse, paired per image on val_test: the class head's accuracy vs the previous phase's "
        "(CI lower end of the difference >= -accuracy_margin) and the exit accuracy of the gate's ranking vs "
        "the softmax policy's on the same checkpoint, at the softmax policy's coverage (CI lower end >= "
        "-exit_accuracy_margin); the gate's extra coverage is judged by gate_beats_softmax")

declare("gate_calibration_works", "evaluation",
        "not worse, paired per image on val_test: the calibrated gate score's Brier score vs the raw "
        "sigmoid's (CI upper end of calibrated minus raw <= calibration_margin); ECE and its CI reported")


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
    """Superiority: the paired bootstrap CI's lower end of the val_test coverage gain exceeds ``min_gain``."""
    gain = compare(gate_coverage, softmax_coverage, margin=max(min_gain, 0.0), direction="superiority",
                   ci=(float(ci["ci_lower"]), float(ci["ci_upper"])))
    passed = gain.worst_gain > min_gain + SLACK
    message = (
        f"val_test coverage gate {gate_coverage:.4f} vs softmax {softmax_coverage:.4f}: gain {gain.difference:+.4f} "
        f"(paired bootstrap CI [{ci['ci_lower']:+.4f}, {ci['ci_upper']:+.4f}]); superiority needs the CI's lower "
        f"end > {min_gain:+.4f}: {'passes' if passed else 'FAILS'}"
    )
    return GateVerdict("gate_beats_softmax", passed, message,
                       {"gate_coverage": gate_coverage, "softmax_coverage": softmax_coverage, "gain": gain.difference,
                        "gain_ci_lower": ci["ci_lower"], "gain_ci_upper": ci["ci_upper"], "min_gain": min_gain})


def check_no_classification_regression(
    current: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray], previous_phase: str,
    gate_exit_accuracy: float | None, softmax_exit_accuracy: float | None,
    exit_accuracy_ci: Mapping[str, float] | None, accuracy_margin: float, exit_accuracy_margin: float,
    bootstrap: Mapping[str, Any],
) -> GateVerdict:
    """Non-inferiority, paired on val_test: accuracy vs the previous phase; gate vs softmax exit accuracy.

    ``current`` / ``previous`` hold the per-image 0/1 ``correct`` of the two fixed class heads;
    ``gate_exit_accuracy`` is the gate ranking's exit accuracy at the softmax policy's coverage and
    ``exit_accuracy_ci`` the paired bootstrap CI of its difference to softmax's that the
    evaluation computed on the same images. Without that CI the exit-accuracy clause fails (no
    evidence), as it does when the gate policy exits nothing.
    """
    parts = [("accuracy", f"val_test accuracy vs {previous_phase}",
              *paired_compare(current["correct"], previous["correct"], margin=accuracy_margin,
                              direction="non-inferiority", **bootstrap))]
    problems = []
    figures: dict[str, Any] = {"previous_phase": previous_phase, "gate_exit_accuracy": gate_exit_accuracy,
                               "softmax_exit_accuracy": softmax_exit_accuracy}
    if gate_exit_accuracy is None:
        problems.append("the gate policy exits nothing on val_test, so its exit accuracy is undefined")
    elif softmax_exit_accuracy is None:
        problems.append("the softmax policy exits nothing on val_test: no exit accuracy to compare with")
    elif exit_accuracy_ci is None or not all(math.isfinite(float(exit_accuracy_ci[k])) for k in ("ci_lower", "ci_upper")):
        problems.append("no paired CI of the exit-accuracy difference: no evidence that the gate is not worse")
    else:
        exit_accuracy = compare(gate_exit_accuracy, softmax_exit_accuracy, margin=exit_accuracy_margin,
                                ci=(float(exit_accuracy_ci["ci_lower"]), float(exit_accuracy_ci["ci_upper"])))
        parts.append(("exit_accuracy", "val_test exit accuracy gate vs softmax at softmax's coverage", exit_accuracy,
                      {"n": int(np.asarray(current["correct"]).size)}))
    return paired_verdict("no_classification_regression", [p for p in parts], problems, figures)


def check_gate_calibration_works(calibration: Mapping[str, Any], margin: float) -> GateVerdict:
    """Non-inferiority, paired on val_test: the calibrated gate score's Brier score vs the raw sigmoid's.

    ``calibration["brier_difference"]`` is the paired bootstrap CI of calibrated minus raw Brier
    (lower is better); the clause passes when its upper end is <= ``margin``. ECE is reported with
    its bootstrap CI but not judged: at ~800 images its CI is as wide as the ECE itself.
    """
    event = calibration.get("event")
    difference = calibration.get("brier_difference")
    if not difference or not all(math.isfinite(float(difference.get(k, math.nan))) for k in ("ci_lower", "ci_upper")):
        return GateVerdict("gate_calibration_works", False,
                           "no paired CI of the Brier difference (calibrated vs raw sigmoid): no evidence that "
                           "calibration does not make the gate worse; re-materialise the evaluation", dict(calibration))
    brier = compare(calibration["brier_calibrated"], calibration["brier_raw_sigmoid"], margin=margin,
                    higher_is_better=False, ci=(float(difference["ci_lower"]), float(difference["ci_upper"])))
    ece = calibration.get("ece_difference") or {}
    ece_text = (f"; ECE {calibration['ece_calibrated']:.4f} vs raw {calibration['ece_raw_sigmoid']:.4f} "
                f"(difference CI [{ece.get('ci_lower', math.nan):+.4f}, {ece.get('ci_upper', math.nan):+.4f}], "
                "reported, not judged)")
    parts = [("brier", f"val_test Brier x100 of the gate score for event '{event}', calibrated vs raw sigmoid",
              brier, {"n": int(difference.get("n", 0)) or None})]
    verdict = paired_verdict("gate_calibration_works", parts, [], dict(calibration))
    return GateVerdict(verdict.criterion, verdict.passed, verdict.message + ece_text, verdict.figures)


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
    if "gate_at_softmax_coverage" not in c:
        raise ValueError(f"evaluation[{ctx.partition}] predates the matched-coverage exit-accuracy comparison: "
                         "re-materialise it")
    current, before = paired_val_test(ctx, previous)
    return check_no_classification_regression(
        current, before, previous, c["gate_at_softmax_coverage"]["exit_accuracy"], c["softmax"]["exit_accuracy"],
        c.get("exit_accuracy_difference"), float(ctx.cfg.accuracy_margin), float(ctx.cfg.exit_accuracy_margin),
        bootstrap_settings(ctx))


@reader("gate_calibration_works")
def _gate_calibration_works(ctx: StepContext) -> GateVerdict:
    return check_gate_calibration_works(_gate_comparison(ctx)["calibration"], float(ctx.cfg.calibration_margin))
