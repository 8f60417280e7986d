"""Pure functions that decide each phase-gate criterion (see ``stage1_core.phases``).

Each returns a :class:`GateVerdict` with the figures behind the decision, so the Dagster check
that wraps it only turns the verdict into an ``AssetCheckResult``. Nothing here falls back to a
default: a criterion that cannot be evaluated fails and says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


ACCURACY_TOLERANCE = 0.01
COVERAGE_TOLERANCE = 0.02


@dataclass(frozen=True)
class GateVerdict:
    """Outcome of one criterion: pass/fail, a one-line message, and the figures behind it."""

    criterion: str
    passed: bool
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", bool(self.passed))

    def describe(self) -> str:
        state = "passed" if self.passed else "FAILED"
        return f"{self.criterion} {state}: {self.message}"


def _finite(values: Iterable[Any]) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in values)


def check_training_completed(history: Sequence[Mapping[str, Any]], best_checkpoint_exists: bool) -> GateVerdict:
    """Training ran at least one epoch, every logged loss is finite, and a best checkpoint exists."""
    epochs = len(history)
    train_losses = [row.get("Train_Loss") for row in history]
    val_losses = [row.get("Val_Loss") for row in history]
    finite = epochs > 0 and _finite(train_losses) and _finite(val_losses)
    passed = finite and best_checkpoint_exists
    if epochs == 0:
        message = "no epoch was logged"
    elif not finite:
        bad = [i + 1 for i, (a, b) in enumerate(zip(train_losses, val_losses)) if not _finite([a, b])]
        message = f"non-finite loss in epoch(s) {bad}"
    elif not best_checkpoint_exists:
        message = "no best checkpoint was written"
    else:
        message = f"{epochs} epoch(s), all losses finite"
    return GateVerdict(
        "training_completed",
        passed,
        message,
        {"epochs_run": epochs, "losses_finite": finite, "best_checkpoint_exists": best_checkpoint_exists,
         "last_train_loss": _float_or_none(train_losses[-1]) if epochs else None},
    )


def check_val_accuracy_vs_baseline(
    head_accuracy: float,
    baseline_accuracy: float,
    baseline_source: str,
    majority_accuracy: float | None = None,
    tolerance: float = ACCURACY_TOLERANCE,
) -> GateVerdict:
    """val_select accuracy of the head >= reference - tolerance (1 point by default).

    The reference is the baseline, raised to the majority-class rate when that is higher: on
    NATIX-like priors (~90% roadwork) a head that always answers "roadwork" would otherwise pass
    against a weak baseline.
    """
    reference, source = baseline_accuracy, baseline_source
    if majority_accuracy is not None and majority_accuracy > baseline_accuracy:
        reference, source = majority_accuracy, f"majority-class rate (above the {baseline_source})"
    margin = head_accuracy - (reference - tolerance)
    passed = bool(margin >= -1e-12)
    message = (
        f"head accuracy {head_accuracy:.4f} vs reference {reference:.4f} ({source}); "
        f"needs >= {reference - tolerance:.4f}"
    )
    return GateVerdict(
        "val_accuracy_vs_baseline",
        passed,
        message,
        {"head_accuracy": head_accuracy, "baseline_accuracy": baseline_accuracy,
         "baseline_source": baseline_source, "majority_accuracy": majority_accuracy,
         "reference_accuracy": reference, "tolerance": tolerance, "margin": margin},
    )


def check_thresholds_certified(thresholds: Mapping[str, Any] | None, schema_problems: Sequence[str],
                               threshold_key: str | None = None, bound_key: str | None = None) -> GateVerdict:
    """The policy file is schema-valid and its threshold is certified on val_calib.

    ``threshold_key`` / ``bound_key`` name the policy file's threshold and FNR bound (the policy
    class's ``threshold_key`` / ``bound_key``); by default the first present of the built-in names.
    """
    if thresholds is None or schema_problems:
        return GateVerdict(
            "thresholds_certified",
            False,
            "thresholds.json is not schema-valid: " + "; ".join(schema_problems or ["missing"]),
            {"schema_valid": False},
        )
    certified = bool(thresholds.get("certified"))
    keys = (threshold_key,) if threshold_key else ("exit_threshold", "gate_threshold", "lambda1")
    threshold = next((thresholds[k] for k in keys if k in thresholds), None)
    bound = thresholds.get(bound_key) if bound_key else thresholds.get("fnr_upper_bound", thresholds.get("fnr_bound"))
    figures = {
        "schema_valid": True,
        "certified": certified,
        "policy": thresholds.get("policy"),
        "exit_threshold": threshold,
        "coverage": thresholds.get("coverage"),
        "fnr_upper_bound": bound,
        "n_exited_positives": thresholds.get("n_exited_positives"),
        "method": thresholds.get("method"),
    }
    if certified:
        message = (
            f"{thresholds.get('policy', 'softmax')} threshold {threshold:.6f} certified by {thresholds.get('method')}: "
            f"coverage {thresholds['coverage']:.4f}, FNR bound {bound:.4f} "
            f"on {thresholds['n_exited_positives']} exited positives"
        )
    else:
        message = f"no threshold certified on val_calib: {thresholds.get('reason')}"
    return GateVerdict("thresholds_certified", certified, message, figures)


def val_test_fnr_figures(
    n_exited_positives: int, n_false_negatives: int, target_fnr: float, delta: float, alpha: float
) -> dict[str, Any]:
    """Point estimate, one-sided exact binomial p-value of H0 "FNR <= target", and the CP bound."""
    from scipy.stats import binom  # scipy loads here, not when the code location imports the gates

    from stage1_core.calibration.bounds import fnr_upper_bound, positives_needed

    n, k = int(n_exited_positives), int(n_false_negatives)
    fnr = k / n if n else None
    # P(K >= k | N = n, FNR = target): small when val_test shows more misses than the target allows.
    p_exceeds = float(binom.sf(k - 1, n, target_fnr)) if n else None
    return {
        "n_exited_positives": n, "n_false_negatives": k, "fnr_on_exited": fnr, "target_fnr": float(target_fnr),
        "delta": float(delta), "alpha": float(alpha), "p_value_fnr_above_target": p_exceeds,
        "fnr_upper_bound": float(fnr_upper_bound(k, n, delta)) if n else 1.0,
        "positives_needed_for_bound": positives_needed(target_fnr, delta, k),
    }


def check_test_fnr(
    n_exited_positives: int,
    n_false_negatives: int,
    target_fnr: float,
    delta: float,
    mode: str = "confirm",
    alpha: float = 0.05,
    bootstrap_ci: Sequence[float | None] | None = None,
) -> GateVerdict:
    """The val_test judgement of the certified policy (``mode`` ``confirm`` or ``bound``).

    ``confirm`` (default) fails when val_test gives significant evidence that FNR_on_exited >
    target: the one-sided exact binomial p-value P(K >= k | N, target) <= ``alpha``. A policy
    certified at maximum coverage has its true FNR just under the target, so demanding a second
    certificate on val_test (``bound``: the Clopper-Pearson upper bound <= target) fails honest
    policies most of the time; it stays available as the strict choice. Both modes report the
    point estimate, the bootstrap CI and the CP bound; no exited positive fails either way.
    """
    figures = val_test_fnr_figures(n_exited_positives, n_false_negatives, target_fnr, delta, alpha)
    figures["mode"] = mode
    if bootstrap_ci is not None:
        figures["bootstrap_ci_lower"], figures["bootstrap_ci_upper"] = (list(bootstrap_ci) + [None, None])[:2]
    n, k = figures["n_exited_positives"], figures["n_false_negatives"]
    bound = figures["fnr_upper_bound"]
    if mode not in ("confirm", "bound"):
        raise ValueError(f"val_test_check={mode!r}: use 'confirm' or 'bound'")
    if n == 0:
        return GateVerdict("val_test_fnr_bound", False,
                           "no exited positive on val_test: FNR_on_exited is undefined, nothing confirms the certificate",
                           figures)
    described = f"val_test FNR_on_exited {k / n:.4f} ({k}/{n}), CP upper bound {bound:.4f}"
    if mode == "confirm":
        p = figures["p_value_fnr_above_target"]
        passed = p > alpha
        message = (
            f"{described}; no significant evidence that FNR > {target_fnr} (p = {p:.3g} > alpha {alpha})"
            if passed else
            f"{described}; significant evidence that FNR > target {target_fnr} (p = {p:.3g} <= alpha {alpha}): "
            f"the certificate does not hold on val_test (calibration/test shift?)"
        )
    else:
        passed = bound <= target_fnr
        message = (
            f"{described} <= target {target_fnr}" if passed else
            f"{described} > target {target_fnr}; a second certificate needs >= "
            f"{figures['positives_needed_for_bound']} exited positives with {k} misses"
        )
    return GateVerdict("val_test_fnr_bound", bool(passed), message, figures)


def check_bundle_verified(problems: Sequence[str], n_compared: int, n_mismatched: int) -> GateVerdict:
    """The staged bundle verified (checksums, schema, load) and reproduced every decision."""
    passed = not problems and n_compared > 0 and n_mismatched == 0
    if passed:
        message = f"bundle verified; its predictor reproduced all {n_compared} val_test decisions"
    elif problems:
        message = "bundle verification failed: " + "; ".join(problems)
    else:
        message = f"{n_mismatched} of {n_compared} val_test decisions differ from the evaluation"
    return GateVerdict(
        "bundle_verified", passed, message,
        {"problems": len(problems), "n_compared": n_compared, "n_mismatched": n_mismatched},
    )


def augrc_closed_form(confidence: np.ndarray, residuals: np.ndarray) -> float:
    """AUGRC from its closed form (METHODS §3), independent of the curve-based implementation."""
    from sklearn.metrics import roc_auc_score

    residuals = np.asarray(residuals, dtype=float)
    accuracy = 1.0 - residuals.mean()
    correct = 1 - residuals.astype(int)
    if correct.min() == correct.max():
        auroc = 0.5
    else:
        auroc = float(roc_auc_score(correct, np.asarray(confidence, dtype=float)))
    return (1.0 - auroc) * accuracy * (1.0 - accuracy) + (1.0 - accuracy) ** 2 / 2.0


def risk_at_coverage_naive(confidence: np.ndarray, residuals: np.ndarray, coverage: float) -> float:
    """Selective risk of the smallest tie-respecting acceptance set reaching ``coverage`` (slow, plain)."""
    confidence = np.asarray(confidence, dtype=float)
    residuals = np.asarray(residuals, dtype=float)
    n = len(confidence)
    for t in sorted(set(confidence.tolist()), reverse=True):
        accepted = confidence >= t
        if accepted.sum() / n >= coverage - 1e-12:
            return float(residuals[accepted].mean())
    return float(residuals.mean())


def check_selective_metrics_recomputed(
    reported: Mapping[str, float], confidence: np.ndarray, residuals: np.ndarray, tolerance: float = 1e-9
) -> GateVerdict:
    """Reported AUGRC and Risk@Coverage equal an independent recomputation from the saved logits."""
    recomputed = {"augrc": augrc_closed_form(confidence, residuals)}
    for c in (0.5, 0.6, 0.7, 0.8, 0.9):
        recomputed[f"risk@{c}"] = risk_at_coverage_naive(confidence, residuals, c)
    diffs = {}
    for key, value in recomputed.items():
        if key not in reported or reported[key] is None:
            diffs[key] = float("inf")
        else:
            diffs[key] = abs(float(reported[key]) - value)
    worst = max(diffs, key=diffs.get)
    passed = diffs[worst] <= tolerance
    message = (
        f"all {len(diffs)} selective metrics match the recomputation (max |diff| {diffs[worst]:.2e})"
        if passed
        else f"{worst} differs: reported {reported.get(worst)} vs recomputed {recomputed[worst]:.6f}"
    )
    figures = {f"recomputed_{k}": v for k, v in recomputed.items()}
    figures.update({f"reported_{k}": _float_or_none(reported.get(k)) for k in recomputed})
    figures["max_abs_diff"] = diffs[worst]
    return GateVerdict("selective_metrics_recomputed", passed, message, figures)


#: Training-log column and direction of each selection metric.
SELECTION_COLUMNS: dict[str, tuple[str, bool]] = {"accuracy": ("Val_Acc", True), "augrc": ("AUGRC", False)}


def check_selected_checkpoint_is_best(
    history: Sequence[Mapping[str, Any]], chosen_epoch: int, selection_metric: str
) -> GateVerdict:
    """The chosen checkpoint is the val_select-best epoch by ``selection_metric`` (earliest on ties)."""
    column, higher_is_better = SELECTION_COLUMNS[selection_metric]
    values = [(int(row["Epoch"]), float(row[column])) for row in history if row.get(column) not in (None, "")]
    if not values:
        return GateVerdict(
            "selected_checkpoint_is_best", False, f"the training log has no {column} column", {"column": column}
        )
    sign = -1.0 if higher_is_better else 1.0
    best_epoch, best_value = min(values, key=lambda item: (sign * item[1], item[0]))
    chosen_value = dict(values).get(chosen_epoch)
    passed = chosen_value is not None and sign * chosen_value <= sign * best_value
    message = (
        f"chosen epoch {chosen_epoch} is the best by val_select {column} ({best_value:.6f})"
        if passed
        else f"chosen epoch {chosen_epoch} ({column} {chosen_value}) is not the best epoch {best_epoch} "
        f"({column} {best_value:.6f})"
    )
    return GateVerdict(
        "selected_checkpoint_is_best", passed, message,
        {"selection_metric": selection_metric, "column": column, "chosen_epoch": chosen_epoch,
         "best_epoch": best_epoch, "best_value": best_value, "chosen_value": _float_or_none(chosen_value)},
    )


#: Valid range of every metric evaluation reports (inclusive).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "mcc": (-1.0, 1.0), "ece": (0.0, 1.0),
    "nll": (0.0, math.inf), "brier": (0.0, 2.0), "augrc": (0.0, 0.5), "coverage": (0.0, 1.0),
    "coverage_at_deploy_prior": (0.0, 1.0), "fnr_on_exited": (0.0, 1.0), "fnr_on_exited_cp_upper": (0.0, 1.0),
    "exit_accuracy": (0.0, 1.0),
}


def check_metrics_in_range(rows: Iterable[Mapping[str, Any]]) -> GateVerdict:
    """Every reported value and CI bound lies in its metric's valid range (NaN allowed only when undefined)."""
    problems = []
    checked = 0
    for row in rows:
        name = str(row["metric"])
        lo, hi = METRIC_RANGES.get(name, (0.0, 1.0) if name.startswith(("risk@", "coverage@")) else (-math.inf, math.inf))
        for column in ("value", "ci_lower", "ci_upper"):
            value = row.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            checked += 1
            if not (lo - 1e-12 <= float(value) <= hi + 1e-12):
                problems.append(f"{name}.{column}={value} outside [{lo}, {hi}]")
    passed = not problems and checked > 0
    message = f"{checked} figures within range" if passed else "; ".join(problems) or "no metric to check"
    return GateVerdict("metrics_in_range", passed, message, {"checked": checked, "out_of_range": len(problems)})


def check_no_regression(
    previous: Mapping[str, float],
    current: Mapping[str, float],
    accuracy_tolerance: float = ACCURACY_TOLERANCE,
    coverage_tolerance: float = COVERAGE_TOLERANCE,
) -> GateVerdict:
    """Accuracy not lower than the previous phase by > 1 point, certified coverage not by > 2 points."""
    acc_drop = previous["accuracy"] - current["accuracy"]
    cov_drop = previous["coverage"] - current["coverage"]
    failures = []
    if acc_drop > accuracy_tolerance + 1e-12:
        failures.append(f"accuracy {current['accuracy']:.4f} is {acc_drop:.4f} below the previous phase's {previous['accuracy']:.4f}")
    if cov_drop > coverage_tolerance + 1e-12:
        failures.append(f"certified coverage {current['coverage']:.4f} is {cov_drop:.4f} below the previous phase's {previous['coverage']:.4f}")
    passed = not failures
    message = (
        f"accuracy {current['accuracy']:.4f} (prev {previous['accuracy']:.4f}), coverage "
        f"{current['coverage']:.4f} (prev {previous['coverage']:.4f})"
        if passed else "; ".join(failures)
    )
    return GateVerdict(
        "no_regression_vs_previous_phase", passed, message,
        {"accuracy": current["accuracy"], "previous_accuracy": previous["accuracy"], "accuracy_drop": acc_drop,
         "coverage": current["coverage"], "previous_coverage": previous["coverage"], "coverage_drop": cov_drop},
    )


@dataclass(frozen=True)
class CheckRecord:
    """The latest recorded evaluation of one gate check, as the cross-run guards see it.

    ``judged_id`` identifies the materialisation the evaluation judged and ``current_id`` the
    latest materialisation of that asset partition; they differ when the asset was rebuilt after
    the check ran, so the verdict no longer applies.
    """

    criterion: str
    passed: bool | None
    message: str = ""
    judged_id: int | None = None
    current_id: int | None = None


def gate_failures(expected: Sequence[str], records: Mapping[str, CheckRecord]) -> list[str]:
    """Every reason a phase gate does not count as passed, one line per criterion.

    A criterion fails when it was never evaluated, its asset was never materialised, its latest
    evaluation failed, or that evaluation judged an older materialisation than the current one. A
    phase whose gate lists no criteria cannot pass.
    """
    if not expected:
        return ["the phase's gate lists no criteria, so it cannot pass"]
    failures = []
    for name in expected:
        record = records.get(name)
        if record is None or record.passed is None:
            failures.append(f"{name}: never evaluated")
        elif record.current_id is None:
            failures.append(f"{name}: the asset it judges has no materialisation; materialise it and re-run the check")
        elif not record.passed:
            failures.append(f"{name}: failed ({record.message})" if record.message else f"{name}: failed")
        elif record.current_id is not None and record.judged_id != record.current_id:
            failures.append(
                f"{name}: its latest evaluation judged materialisation {record.judged_id}, "
                f"but the asset was rebuilt since (now {record.current_id}); re-run the check"
            )
    return failures


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
    if previous_accuracy - accuracy > tolerance + 1e-12:
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


# ----- phase 4 and 5: adapted backbone, PEFT, memory, SAM / F-SAM -----------------------------

PERFORMANCE_ACCURACY_TOLERANCE = 0.005


def check_explora_pretraining(losses_finite: bool, gain: Mapping[str, Any]) -> GateVerdict:
    """ExPLoRA ran with finite losses and cut the held-out masked-reconstruction loss by >= the margin.

    ``gain`` is :func:`stage1_core.domain_adaptation.explora.reconstruction_gain` with a
    decoder-only control: the reduction from the start must reach ``margin`` and the adapted
    backbone must end below the control (a decoder trained from scratch lowers the loss by itself).
    """
    problems = []
    if not losses_finite:
        problems.append("a pre-training loss was not finite")
    start, end, relative = gain.get("start"), gain.get("end"), gain.get("relative_reduction")
    margin = float(gain.get("margin", 0.0))
    if relative is None:
        problems.append("the held-out loss was not measured at both start and end")
    elif relative < margin:
        problems.append(f"held-out reconstruction loss fell {100 * relative:.1f}% ({start:.4f} -> {end:.4f}), "
                        f"less than the required {100 * margin:.1f}%")
    over_control = gain.get("relative_to_control")
    if over_control is not None and over_control <= 0:
        problems.append(f"the adapted backbone ends at {end:.4f}, not below the decoder-only control's "
                        f"{gain.get('control_end'):.4f}: the gain is the decoder's, not the backbone's")
    message = "; ".join(problems) or (
        f"held-out reconstruction loss {start:.4f} -> {end:.4f} (-{100 * relative:.1f}%, needs "
        f">= {100 * margin:.1f}%); decoder-only control ends at {gain.get('control_end'):.4f} "
        f"({100 * over_control:+.1f}% for the adapted backbone)"
    )
    return GateVerdict("explora_pretraining_completed", not problems, message,
                       {"losses_finite": bool(losses_finite), **{k: v for k, v in gain.items() if k != "passed"}})


def check_peft_applied(init: Mapping[str, Any], final: Mapping[str, Any]) -> GateVerdict:
    """Adapters sit exactly on the expected modules, start as the identity, merge exactly, and only they train.

    ``init`` is :func:`stage1_core.model.peft.verify_peft` right after the adapters were applied,
    ``final`` the same after training (its ``init_max_abs_diff`` then measures how far training
    moved the output, so only the merged and adapters-off differences are judged there).
    """
    problems = []
    if init.get("missing_modules") or init.get("unexpected_modules") or not init.get("adapted_modules"):
        problems.append(f"adapters on the wrong modules: missing {init.get('missing_modules')}, unexpected "
                        f"{init.get('unexpected_modules')}")
    atol = float(init.get("atol", 1e-4))
    for label, value in (("output at initialisation vs base", init.get("init_max_abs_diff")),
                         ("merged vs unmerged at initialisation", init.get("merged_max_abs_diff")),
                         ("merged vs unmerged after training", final.get("merged_max_abs_diff")),
                         ("adapters switched off vs base after training", final.get("disabled_max_abs_diff"))):
        if value is None or not math.isfinite(float(value)) or float(value) > atol:
            problems.append(f"{label}: max |diff| {value} > {atol}")
    if init.get("non_adapter_trainable"):
        problems.append(f"non-adapter backbone parameters train: {list(init['non_adapter_trainable'])[:5]}")
    message = "; ".join(problems) or (
        f"{init.get('kind')} on {len(init['adapted_modules'])} modules as expected; init diff "
        f"{init['init_max_abs_diff']:.2e}, merged diff {final['merged_max_abs_diff']:.2e} (atol {atol:g}); "
        f"trainable {init['trainable']} of {init['total']} backbone parameters ({100 * init['trainable_fraction']:.2f}%)"
    )
    figures = {"kind": init.get("kind"), "adapted_modules": len(init.get("adapted_modules") or []),
               "init_max_abs_diff": init.get("init_max_abs_diff"), "merged_max_abs_diff": final.get("merged_max_abs_diff"),
               "disabled_max_abs_diff": final.get("disabled_max_abs_diff"), "trainable": init.get("trainable"),
               "total": init.get("total"), "trainable_fraction": init.get("trainable_fraction"), "atol": atol}
    return GateVerdict("peft_applied_correctly", not problems, message, figures)


def check_performance_maintained(current: Mapping[str, float], previous: Mapping[str, float], previous_phase: str,
                                 accuracy_tolerance: float = PERFORMANCE_ACCURACY_TOLERANCE,
                                 coverage_tolerance: float = COVERAGE_TOLERANCE) -> GateVerdict:
    """val_select accuracy >= previous - 0.5 point and certified val_calib coverage >= previous - 2 points."""
    problems = []
    acc_drop = previous["accuracy"] - current["accuracy"]
    cov_drop = previous["coverage"] - current["coverage"]
    if acc_drop > accuracy_tolerance + 1e-12:
        problems.append(f"val_select accuracy {current['accuracy']:.4f} is {acc_drop:.4f} below {previous_phase}'s "
                        f"{previous['accuracy']:.4f} (allowed {accuracy_tolerance})")
    if cov_drop > coverage_tolerance + 1e-12:
        problems.append(f"certified coverage {current['coverage']:.4f} is {cov_drop:.4f} below {previous_phase}'s "
                        f"{previous['coverage']:.4f} (allowed {coverage_tolerance})")
    message = "; ".join(problems) or (
        f"val_select accuracy {current['accuracy']:.4f} ({previous_phase} {previous['accuracy']:.4f}), certified "
        f"coverage {current['coverage']:.4f} ({previous_phase} {previous['coverage']:.4f})")
    return GateVerdict("performance_maintained", not problems, message,
                       {"accuracy": current["accuracy"], "previous_accuracy": previous["accuracy"],
                        "coverage": current["coverage"], "previous_coverage": previous["coverage"],
                        "previous_phase": previous_phase, "accuracy_tolerance": accuracy_tolerance,
                        "coverage_tolerance": coverage_tolerance})


def check_no_memory_issues(oom_fallback: bool | None, peak_gb: float | None, budget_gb: float,
                           reference: Mapping[str, Any] | None = None) -> GateVerdict:
    """No out-of-memory batch-size fallback and peak memory within the budget (reference phase beside it)."""
    problems = []
    if oom_fallback:
        problems.append("the out-of-memory fallback batch size was needed")
    if peak_gb is None or not math.isfinite(float(peak_gb)):
        problems.append("peak memory was not measured")
    elif peak_gb > budget_gb:
        problems.append(f"peak memory {peak_gb:.2f} GiB exceeds memory_budget_gb {budget_gb:.2f}")
    ref = dict(reference or {})
    beside = f"; {ref['phase']} peaked at {ref['peak_gb']:.2f} GiB" if ref.get("peak_gb") is not None else ""
    message = "; ".join(problems) or f"peak {peak_gb:.2f} GiB <= budget {budget_gb:.2f} GiB, no OOM fallback{beside}"
    return GateVerdict("no_memory_issues", not problems, message,
                       {"oom_fallback": bool(oom_fallback), "peak_gb": peak_gb, "budget_gb": budget_gb,
                        "reference_phase": ref.get("phase"), "reference_peak_gb": ref.get("peak_gb")})


def loss_spikes(step_losses: Sequence[float], factor: float, window: int = 20, warmup: int = 10) -> list[int]:
    """1-based steps whose loss exceeds the running median by more than ``factor - 1`` running scales.

    Running median and scale are taken over the previous ``window`` steps; the scale is the median
    of ``|loss|``. For a positive loss this is exactly "loss > factor x running median"; the
    gated heads' loss has a coverage reward and can be negative, which a plain ratio cannot judge.
    The first ``warmup`` steps only seed the median (early losses fall fast and are noisy); a run
    shorter than ``3 x warmup`` steps is seeded with its first third (at least one step), so a short
    fine-tuning run is judged too rather than passing unexamined.
    """
    losses = [float(v) for v in step_losses]
    seed = min(warmup, max(1, len(losses) // 3))
    spikes = []
    for i in range(seed, len(losses)):
        previous = losses[max(0, i - window):i]
        median, scale = float(np.median(previous)), float(np.median(np.abs(previous)))
        if scale > 0 and losses[i] > median + (factor - 1.0) * scale:
            spikes.append(i + 1)
    return spikes


def check_training_stable(step_losses: Sequence[float], grad_norms: Sequence[float], factor: float) -> GateVerdict:
    """No loss spike above ``factor`` x the running median and no non-finite loss or gradient norm."""
    problems = []
    bad_norms = [i + 1 for i, v in enumerate(grad_norms) if not math.isfinite(float(v))]
    bad_losses = [i + 1 for i, v in enumerate(step_losses) if not math.isfinite(float(v))]
    if not step_losses:
        problems.append("no optimiser step was recorded")
    if bad_norms:
        problems.append(f"non-finite gradient norm at step(s) {bad_norms[:10]}")
    if bad_losses:
        problems.append(f"non-finite training loss at step(s) {bad_losses[:10]}")
    finite = [v if math.isfinite(float(v)) else 0.0 for v in step_losses]
    spikes = loss_spikes(finite, factor)
    if spikes:
        problems.append(f"{len(spikes)} loss spike(s) above {factor:g}x the running median, at step(s) {spikes[:10]}")
    finite_norms = [float(v) for v in grad_norms if math.isfinite(float(v))]
    message = "; ".join(problems) or (
        f"{len(step_losses)} steps, no loss spike above {factor:g}x the running median, gradient norms finite "
        f"(max {max(finite_norms):.3g}, median {float(np.median(finite_norms)):.3g})")
    return GateVerdict("training_stable", not problems, message,
                       {"steps": len(step_losses), "spikes": len(spikes), "spike_factor": factor,
                        "non_finite_grad_norms": len(bad_norms),
                        "max_grad_norm": max(finite_norms) if finite_norms else None,
                        "median_grad_norm": float(np.median(finite_norms)) if finite_norms else None})


def check_improves_over_adamw(current: Mapping[str, Any], reference: Mapping[str, Any], metric: str, mode: str,
                              coverage_tolerance: float = COVERAGE_TOLERANCE) -> GateVerdict:
    """The SAM/F-SAM run's selection metric beats the AdamW reference's; certified coverage within 2 points.

    ``mode`` is ``"min"`` (AUGRC: lower is better) or ``"max"`` (accuracy).
    """
    value, ref_value = float(current["selection_value"]), float(reference["selection_value"])
    better = value < ref_value if mode == "min" else value > ref_value
    cov_drop = float(reference["coverage"]) - float(current["coverage"])
    problems = []
    if not better:
        problems.append(f"val_select {metric} {value:.5f} is not better than {reference['phase']}'s {ref_value:.5f} "
                        f"({'lower' if mode == 'min' else 'higher'} is better)")
    if cov_drop > coverage_tolerance + 1e-12:
        problems.append(f"certified coverage {current['coverage']:.4f} is {cov_drop:.4f} below {reference['phase']}'s "
                        f"{reference['coverage']:.4f}")
    message = "; ".join(problems) or (
        f"val_select {metric} {value:.5f} vs {reference['phase']} (AdamW) {ref_value:.5f}; certified coverage "
        f"{current['coverage']:.4f} vs {reference['coverage']:.4f}")
    return GateVerdict("improves_over_adamw", not problems, message,
                       {"metric": metric, "value": value, "reference_value": ref_value, "reference_phase": reference["phase"],
                        "coverage": float(current["coverage"]), "reference_coverage": float(reference["coverage"]),
                        "optimizer": current.get("optimizer"), "reference_optimizer": reference.get("optimizer")})


# ----- phase 6: conformal risk training, SCRC ---------------------------------------------------


def check_risk_training_works(
    history: Sequence[Mapping[str, Any]], losses_finite: bool, coverage: float, previous_coverage: float,
    previous_phase: str, tolerance: float = ACCURACY_TOLERANCE,
) -> GateVerdict:
    """Conformal risk training ran with finite losses, and its model's certified coverage on val_calib is
    >= the previous phase's - ``tolerance`` (1 point); the gain is reported either way."""
    train_losses = [row.get("Train_Loss") for row in history]
    val_losses = [row.get("Val_Loss") for row in history]
    finite = bool(losses_finite) and len(history) > 0 and _finite(train_losses) and _finite(val_losses)
    gain = float(coverage) - float(previous_coverage)
    problems = []
    if not finite:
        problems.append("no epoch was logged" if not history else "a training or validation loss was not finite")
    if gain < -tolerance - 1e-12:
        problems.append(f"certified coverage {coverage:.4f} is {-gain:.4f} below {previous_phase}'s "
                        f"{previous_coverage:.4f} (tolerance {tolerance})")
    message = "; ".join(problems) or (
        f"{len(history)} epoch(s), finite losses; certified coverage {coverage:.4f} vs {previous_phase}'s "
        f"{previous_coverage:.4f}: gain {gain:+.4f}")
    return GateVerdict("risk_training_works", not problems, message,
                       {"losses_finite": finite, "epochs_run": len(history), "coverage": float(coverage),
                        "previous_coverage": float(previous_coverage), "previous_phase": previous_phase,
                        "coverage_gain": gain, "tolerance": tolerance})


def scrc_exits_plain(g: np.ndarray, q: np.ndarray, lambda1: float | None, lambda2: float | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(exit, answer, set_size)`` of the SCRC rule written out plainly (no code shared with the fitter).

    Selected iff g >= lambda1; set = {y : q_y >= 1 - lambda2}; exit iff selected and the set has one
    label, which is the answer (argmax q elsewhere). ``None`` thresholds exit nothing.
    """
    g = np.asarray(g, dtype=float).reshape(-1)
    q = np.asarray(q, dtype=float)
    if lambda1 is None or lambda2 is None:
        return np.zeros(g.shape[0], dtype=bool), q.argmax(1), np.zeros(g.shape[0], dtype=int)
    members = q >= 1.0 - float(lambda2)
    size = members.sum(axis=1) * (g >= float(lambda1))
    exit_ = size == 1
    answer = np.where(exit_, members[:, 1].astype(int), q.argmax(1))
    return exit_, answer, size


def _binom_pvalue(k: int, n: int, target: float) -> float:
    from scipy.stats import binom

    return float(binom.cdf(k, n, target)) if n > 0 else 1.0


def recompute_scrc_inductive(policy: Mapping[str, Any], g: np.ndarray, q: np.ndarray, labels: np.ndarray
                             ) -> dict[str, Any]:
    """Recompute every recorded SCRC-I candidate on val_calib: counts, p-values, and the max-coverage certified one.

    Returns the number of rows whose counts differ from the record, rows marked certified whose
    recomputed p-value exceeds the test level (or tested-and-not-certified rows below it), the
    certified row with the most exits, and whether it is the deployed pair.
    """
    y = np.asarray(labels).astype(int)
    target, level = float(policy["target_fnr"]), float(policy["test_level"])
    mismatched, wrong_verdicts = [], []
    best: tuple[int, float, float] | None = None
    for i, row in enumerate(policy.get("sweep_results") or []):
        exits, answer, _ = scrc_exits_plain(g, q, row["lambda1"], row["lambda2"])
        pos = exits & (y == 1)
        n_exit, n_pos, n_fn = int(exits.sum()), int(pos.sum()), int((pos & (answer == 0)).sum())
        if (n_exit, n_pos, n_fn) != (row["n_exited"], row["n_exited_positives"], row["n_false_negatives"]):
            mismatched.append(i)
        p = _binom_pvalue(n_fn, n_pos, target)
        if row["certified"] and p > level * (1 + 1e-9):
            wrong_verdicts.append(i)
        elif row["tested"] and not row["certified"] and p <= level * (1 - 1e-9):
            wrong_verdicts.append(i)
        if row["certified"] and (best is None or n_exit > best[0]):
            best = (n_exit, float(row["lambda1"]), float(row["lambda2"]))
    deployed_exits, _, _ = scrc_exits_plain(g, q, policy.get("lambda1"), policy.get("lambda2"))
    deployed = int(deployed_exits.sum())
    return {
        "n_rows": len(policy.get("sweep_results") or []), "rows_with_other_counts": len(mismatched),
        "rows_with_wrong_verdict": len(wrong_verdicts), "best_certified_exits": None if best is None else best[0],
        "best_certified": None if best is None else [best[1], best[2]], "deployed_exits": deployed,
        "deployed_coverage": deployed / max(len(y), 1), "recorded_coverage": float(policy["coverage"]),
        "deployed_is_best": best is not None and deployed == best[0],
    }


def recompute_scrc_transductive(
    policy: Mapping[str, Any], g_calib: np.ndarray, q_calib: np.ndarray, y_calib: np.ndarray,
    g_batch: np.ndarray, q_batch: np.ndarray, deployed_exits: np.ndarray,
) -> dict[str, Any]:
    """Recompute SCRC-T's thresholds for a batch from the stated formulas (plain loops) and its exits.

    lambda1 = the ceil(rate (n + m))-th largest pooled gate score; on the selected calibration
    positives, lambda2 = the smallest l >= 0.5 over {0.5} and the values 1 - q_1 with
    n_s/(n_s+1) R(l) + 1/(n_s+1) <= target, R(l) = share of them with q_1 < 1 - l (the most
    permissive feasible set threshold, i.e. the max-coverage one).
    """
    import math

    rate, target = float(policy["transductive"]["selection_rate"]), float(policy["target_fnr"])
    pooled = np.sort(np.concatenate([np.asarray(g_calib, float), np.asarray(g_batch, float)]))[::-1]
    lambda1 = float(pooled[max(1, math.ceil(rate * pooled.size - 1e-9)) - 1])
    y = np.asarray(y_calib).astype(int)
    q1 = np.asarray(q_calib, float)[(np.asarray(g_calib) >= lambda1) & (y == 1), 1]
    n_s = q1.size
    lambda2 = None
    values = [float(v) for v in 1.0 - q1 if v >= 0.5]
    candidates = {0.5, *values, *(float(np.nextafter(v, 2.0)) for v in values)}  # float rounding at the boundary
    for lam in sorted(c for c in candidates if c <= 1.0):
        misses = int(np.sum(q1 < 1.0 - lam))
        if n_s and (misses + 1.0) / (n_s + 1.0) <= target + 1e-12:
            lambda2 = lam
            break
    exits, _, _ = scrc_exits_plain(g_batch, q_batch, lambda1 if lambda2 is not None else None, lambda2)
    deployed = np.asarray(deployed_exits, dtype=bool)
    return {"lambda1": lambda1, "lambda2": lambda2, "n_selected_positives": int(n_s),
            "exits_differing": int((exits != deployed).sum()), "recomputed_exits": int(exits.sum()),
            "deployed_exits": int(deployed.sum()), "deployed_is_best": bool(np.array_equal(exits, deployed))}


def check_coverage_maximised(recomputed: Mapping[str, Any], comparison: Mapping[str, Any]) -> GateVerdict:
    """The deployed (lambda1, lambda2) is the max-coverage certified candidate, and SCRC's val_test coverage is
    not below the certified gate and softmax policies' (its special cases) on the same checkpoint.

    ``recomputed``: :func:`recompute_scrc_inductive` or :func:`recompute_scrc_transductive`;
    ``comparison``: the evaluation's ``scrc_comparison``. SCRC's coverage counts as lower than a
    special case's only when the paired bootstrap CI of the difference lies below 0 (significant
    loss); a point estimate below it with a CI reaching 0 passes and is reported.
    """
    problems = []
    if not recomputed.get("deployed_is_best"):
        problems.append(f"the deployed thresholds are not the max-coverage certified candidate "
                        f"(recomputed: {dict(recomputed)})")
    for key in ("rows_with_other_counts", "rows_with_wrong_verdict", "exits_differing"):
        if recomputed.get(key):
            problems.append(f"{recomputed[key]} {key.replace('_', ' ')} in the recomputation")
    scrc = float(comparison["scrc"]["coverage"])
    figures: dict[str, Any] = {"scrc_coverage": scrc, **{f"recomputed_{k}": v for k, v in recomputed.items()
                                                           if not isinstance(v, (list, dict))}}
    parts = []
    for name in ("gate", "softmax"):
        other = float(comparison[name]["coverage"])
        ci = comparison[f"coverage_gain_vs_{name}"]
        figures.update({f"{name}_coverage": other, f"gain_vs_{name}": scrc - other,
                        f"gain_vs_{name}_ci_lower": ci["ci_lower"], f"gain_vs_{name}_ci_upper": ci["ci_upper"]})
        parts.append(f"{name} {other:.4f} (gain {scrc - other:+.4f}, CI [{ci['ci_lower']:+.4f}, {ci['ci_upper']:+.4f}])")
        if scrc < other and ci["ci_upper"] < 0:
            problems.append(f"SCRC's val_test coverage {scrc:.4f} is significantly below the {name} policy's "
                            f"{other:.4f} (paired bootstrap CI of the gain [{ci['ci_lower']:+.4f}, {ci['ci_upper']:+.4f}])")
    message = "; ".join(problems) or (
        f"deployed thresholds are the max-coverage certified candidate; val_test coverage SCRC {scrc:.4f} vs "
        + ", ".join(parts))
    return GateVerdict("coverage_maximised", not problems, message, figures)


def lambda2_grid(lambda2: float | None, n_grid: int = 101) -> np.ndarray:
    """Increasing lambda2 values in [0, 1] (the deployed one included) to check the sets' nesting on."""
    return np.unique(np.concatenate([np.linspace(0.0, 1.0, n_grid), [] if lambda2 is None else [float(lambda2)]]))


def check_prediction_sets_valid(
    sets_by_lambda2: np.ndarray, q: np.ndarray, g: np.ndarray, lambda1: float | None, lambda2: float | None,
    exits: np.ndarray, positive_set_coverage: Mapping[str, Any], target: float,
) -> GateVerdict:
    """Prediction sets on val_test: nested in lambda2, singleton sets exactly the exits, and the set coverage
    of selected positives not significantly below the target ``1 - target_fnr`` the sets were built for
    (its bootstrap CI reaches the target).

    ``sets_by_lambda2`` [k, N, 2]: the deployed code's set memberships at increasing lambda2
    (:func:`lambda2_grid`); ``q``, ``g``: calibrated outputs, from which "selected with a singleton
    set" is recomputed plainly and compared with the deployed ``exits``.
    """
    members = np.asarray(sets_by_lambda2, dtype=bool)
    grid = members.shape[0]
    not_nested = int(np.sum(members[:-1] & ~members[1:]))
    recomputed, _, _ = scrc_exits_plain(g, q, lambda1, lambda2)
    exits = np.asarray(exits, dtype=bool)
    mismatched = int(np.sum(recomputed != exits))
    value, lo, hi = (positive_set_coverage.get(k) for k in ("value", "ci_lower", "ci_upper"))
    problems = []
    if lambda1 is None or lambda2 is None:
        problems.append("no thresholds: the policy exits nothing, so it builds no prediction set")
    if not_nested:
        problems.append(f"{not_nested} set memberships are lost when lambda2 grows (sets must be nested)")
    if mismatched:
        problems.append(f"{mismatched} samples where 'selected with a singleton set' and 'exited' disagree")
    if value is None:
        problems.append("no selected positive on val_test: the set coverage is undefined")
    elif hi < target - 1e-12:
        problems.append(f"set coverage of selected positives {value:.4f} is significantly below the target "
                        f"{target:.4f} (bootstrap CI [{lo:.4f}, {hi:.4f}])")
    message = "; ".join(problems) or (
        f"sets nested over {grid} values of lambda2; singleton sets are exactly the {int(exits.sum())} exits; "
        f"set coverage of selected positives {value:.4f} (CI [{lo:.4f}, {hi:.4f}]) vs target {target:.4f}")
    return GateVerdict("prediction_sets_valid", not problems, message,
                       {"lambda2_grid": int(grid), "not_nested": not_nested, "singleton_exit_mismatches": mismatched,
                        "n_exits": int(exits.sum()), "set_coverage": value, "set_coverage_ci_lower": lo,
                        "set_coverage_ci_upper": hi, "target": float(target),
                        "target_within_ci": None if value is None else bool(lo <= target <= hi)})
