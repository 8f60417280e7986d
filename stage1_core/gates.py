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

from stage1_core.calibration.bounds import fnr_upper_bound, positives_needed

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


def check_thresholds_certified(thresholds: Mapping[str, Any] | None, schema_problems: Sequence[str]) -> GateVerdict:
    """thresholds.json is schema-valid and its threshold is certified on val_calib."""
    if thresholds is None or schema_problems:
        return GateVerdict(
            "thresholds_certified",
            False,
            "thresholds.json is not schema-valid: " + "; ".join(schema_problems or ["missing"]),
            {"schema_valid": False},
        )
    certified = bool(thresholds.get("certified"))
    threshold = next((thresholds[k] for k in ("exit_threshold", "gate_threshold", "lambda1") if k in thresholds), None)
    bound = thresholds.get("fnr_upper_bound", thresholds.get("fnr_bound"))
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
    from scipy.stats import binom

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
) -> GateVerdict:
    """cls accuracy within 1 point of the previous phase; gate exit accuracy within 1 point of softmax's."""
    problems = []
    if previous_accuracy - accuracy > tolerance + 1e-12:
        problems.append(f"val_select accuracy {accuracy:.4f} is more than {tolerance} below {previous_phase}'s "
                        f"{previous_accuracy:.4f}")
    if gate_exit_accuracy is None:
        problems.append("the gate policy exits nothing on val_test, so its exit accuracy is undefined")
    elif softmax_exit_accuracy is not None and softmax_exit_accuracy - gate_exit_accuracy > tolerance + 1e-12:
        problems.append(f"gate exit accuracy {gate_exit_accuracy:.4f} is more than {tolerance} below the softmax "
                        f"policy's {softmax_exit_accuracy:.4f}")
    message = "; ".join(problems) or (
        f"val_select accuracy {accuracy:.4f} ({previous_phase} {previous_accuracy:.4f}); exit accuracy gate "
        f"{gate_exit_accuracy:.4f} vs softmax {softmax_exit_accuracy if softmax_exit_accuracy is not None else float('nan'):.4f}"
    )
    return GateVerdict("no_classification_regression", not problems, message,
                       {"accuracy": accuracy, "previous_accuracy": previous_accuracy, "previous_phase": previous_phase,
                        "gate_exit_accuracy": gate_exit_accuracy, "softmax_exit_accuracy": softmax_exit_accuracy})


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
