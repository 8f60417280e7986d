"""Criteria every phase's gate holds: training, accuracy, selection, certificate, val_test FNR, metrics, regression.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.artifacts import ArtifactError, read_json, schema_errors
from stage1_core.gates import GateVerdict, _finite, _float_or_none
from stage1_core.store import EVALUATION_FILE, policy_path, read_metrics_csv, read_policy_document

from .compare import compare, paired_compare, paired_verdict
from .readers import (bootstrap_settings, deployed_probabilities, evaluation_record, paired_val_test, training_record,
                      val_test_outcomes)
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("training_completed", "checkpoint",
        "training ran to a best checkpoint with finite losses")

declare("val_accuracy_vs_baseline", "evaluation",
        "the deployed head's val_test accuracy is not worse than the accuracy baseline: a class-weighted "
        "logistic-regression probe on the same cached features, paired per image (CI lower end of the "
        "difference >= -baseline_margin, 4 points by default, power stated), or baseline_val_accuracy from "
        "config (bootstrap CI of the head's accuracy); and the head is informative: the CI lower end of its "
        "balanced accuracy is above 0.5, what a constant answer scores")

declare("selected_checkpoint_is_best", "checkpoint",
        "the chosen checkpoint is the best epoch on val_select by the phase's selection metric (accuracy "
        "in phase 1, AUGRC from phase 2)")

declare("thresholds_certified", "exit_policy",
        "the policy file is schema-valid, certified on val_calib with the PAC guarantee the product "
        "promises (P(FNR on exits > target) <= delta; an in-expectation guarantee such as SCRC-T's is "
        "refused), and a replay of the whole certification from the stored predictions (same search, "
        "same candidates, same delta) arrives at the same threshold, coverage and counts")

declare("val_test_fnr_bound", "evaluation",
        "on val_test the one-sided Clopper-Pearson upper bound of FNR_on_exited <= target_fnr_exit (too "
        "few exited positives fails, stating how many are needed)")

declare("selective_metrics_recomputed", "evaluation",
        "reported AUGRC and Risk@Coverage equal an independent recomputation from the saved logits")

declare("metrics_in_range", "evaluation",
        "every reported metric and interval lies in its valid range")

declare("no_regression_vs_previous_phase", "evaluation",
        "not worse than the previous phase on the same val_test images, paired per image: accuracy and "
        "the deployed policy's coverage each pass only when the paired bootstrap CI's lower end of the "
        "difference is >= -accuracy_margin / -coverage_margin (2 / 4 points by default); the verdict "
        "states n, the disagreement share and the power of each margin for two models of equal quality")


# ----- rules (pure) ---------------------------------------------------------------------


def check_training_completed(history: Sequence[Mapping[str, Any]], best_checkpoint_exists: bool) -> GateVerdict:
    """Training ran at least one epoch, every logged loss is finite, and a best checkpoint exists.

    An epoch-0 row (the starting weights evaluated as a selection candidate) has no training loss.
    """
    trained = [row for row in history if int(row.get("Epoch", 1)) > 0]
    epochs = len(trained)
    train_losses = [row.get("Train_Loss") for row in trained]
    val_losses = [row.get("Val_Loss") for row in history]
    finite = epochs > 0 and _finite(train_losses) and _finite(val_losses)
    passed = finite and best_checkpoint_exists
    if epochs == 0:
        message = "no epoch was logged"
    elif not finite:
        bad = sorted({int(row.get("Epoch", 0)) for row in history if not _finite([row.get("Val_Loss")])}
                     | {int(row.get("Epoch", 0)) for row in trained if not _finite([row.get("Train_Loss")])})
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
    labels: np.ndarray,
    predictions: np.ndarray,
    baseline_predictions: np.ndarray | None,
    baseline_accuracy: float | None,
    baseline_source: str,
    margin: float,
    bootstrap: Mapping[str, Any],
) -> GateVerdict:
    """The head is not worse than the accuracy baseline and better than a constant answer.

    ``labels`` / ``predictions``: the head's fixed class decisions per image (val_test).
    Baseline: a model's per-image ``baseline_predictions`` on the same images (paired
    non-inferiority of accuracy at ``margin``), else a fixed ``baseline_accuracy`` (the bootstrap
    CI of the head's accuracy minus it must stay above ``-margin``). Informative: the bootstrap CI
    of the head's balanced accuracy lies above 0.5 - a rule against the majority-class rate would
    pass an always-"roadwork" head (its accuracy *is* that rate) and fail a class-weighted head that
    trades raw accuracy for recall of the rare class. ``bootstrap``: ``n_resamples``,
    ``confidence``, ``seed``.
    """
    from stage1_core.metrics.bootstrap import accuracy_statistic, balanced_accuracy_statistic
    from stage1_core.metrics.bootstrap import bootstrap as percentile_bootstrap

    y = np.asarray(labels).astype(int).reshape(-1)
    head = np.asarray(predictions).astype(int).reshape(-1)
    if head.shape != y.shape or y.size == 0:
        raise ValueError(f"labels and predictions need the same non-zero length, got {y.shape} and {head.shape}")
    settings = {"n_resamples": int(bootstrap["n_resamples"]), "confidence": float(bootstrap["confidence"]),
                "seed": int(bootstrap["seed"])}
    correct = (head == y).astype(float)
    parts = []
    if baseline_predictions is not None:
        reference = (np.asarray(baseline_predictions).astype(int).reshape(-1) == y).astype(float)
        parts.append(("accuracy", f"val_test accuracy vs the {baseline_source}",
                      *paired_compare(correct, reference, margin=margin, direction="non-inferiority", **settings)))
    else:
        if baseline_accuracy is None:
            raise ValueError("an accuracy baseline needs per-image predictions or a fixed accuracy")
        ci = percentile_bootstrap(accuracy_statistic(y, head), y.size, **settings)["accuracy"]
        parts.append(("accuracy", f"val_test accuracy vs the {baseline_source}",
                      compare(correct.mean(), float(baseline_accuracy), margin=margin, direction="non-inferiority",
                              ci=(ci.ci_lower - baseline_accuracy, ci.ci_upper - baseline_accuracy),
                              ci_kind="bootstrap"),
                      {"n": int(y.size)}))
    balanced = percentile_bootstrap(balanced_accuracy_statistic(y, head), y.size, **settings)["balanced_accuracy"]
    constant = 0.5
    parts.append(("balanced_accuracy", "val_test balanced accuracy vs a constant answer",
                  compare(balanced.value, constant, margin=0.0, direction="superiority",
                          ci=(balanced.ci_lower - constant, balanced.ci_upper - constant), ci_kind="bootstrap"),
                  {"n": int(y.size)}))
    majority = float(max(y.mean(), 1.0 - y.mean()))
    return paired_verdict("val_accuracy_vs_baseline", parts,
                          figures={"baseline_source": baseline_source, "head_accuracy": float(correct.mean()),
                                   "majority_accuracy": majority})


#: Training-log column and direction of each selection metric.
SELECTION_COLUMNS: dict[str, tuple[str, bool]] = {
    "accuracy": ("Val_Acc", True), "augrc": ("AUGRC", False), "certified_coverage": ("Certified_Coverage", True),
}


def check_selected_checkpoint_is_best(
    history: Sequence[Mapping[str, Any]], chosen_epoch: int, selection_metric: str
) -> GateVerdict:
    """The chosen checkpoint has the val_select-best value of ``selection_metric``.

    Any epoch holding the best value passes: on ties the trainer keeps the earliest, or for
    ``certified_coverage`` the most accurate (``training.trainer.TIES_BROKEN_BY_ACCURACY``).
    """
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


def check_thresholds_certified(thresholds: Mapping[str, Any] | None, schema_problems: Sequence[str],
                               threshold_key: str | None = None, bound_key: str | None = None,
                               replayed: Mapping[str, Any] | None = None) -> GateVerdict:
    """The policy file is schema-valid, certified with a PAC guarantee, and ``replayed`` (the same fit
    run again on the stored predictions) agrees with it on threshold, bound, coverage and counts.

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
    guarantee = thresholds.get("guarantee", "pac")
    figures["guarantee"] = guarantee
    problems = []
    if certified and str(guarantee).lower() != "pac":
        problems.append(
            f"the policy's guarantee holds in {guarantee}, not with probability 1 - delta (PAC): "
            f"{thresholds.get('scrc_variant', thresholds.get('policy'))} cannot be deployed (SCRC-T needs the test "
            f"batch, which a one-image predictor never has); deploy scrc_variant: I"
        )
    if replayed is not None:
        figures["replayed"] = True
        for key in ("certified", threshold_key or "exit_threshold", bound_key or "fnr_upper_bound", "coverage",
                    "n_exited_positives"):
            if key in thresholds or key in replayed:
                stored, again = thresholds.get(key), replayed.get(key)
                same = (stored == again if not (isinstance(stored, float) and isinstance(again, float))
                        else math.isclose(stored, again, rel_tol=0.0, abs_tol=1e-12))
                if not same:
                    problems.append(f"replaying the certification from the stored predictions gives {key}={again!r}, "
                                    f"the policy file says {stored!r}")
    if not certified:
        message = f"no threshold certified on val_calib: {thresholds.get('reason')}"
    elif problems:
        message = "; ".join(problems)
    else:
        message = (
            f"{thresholds.get('policy', 'softmax')} threshold {threshold:.6f} certified by {thresholds.get('method')}: "
            f"coverage {thresholds['coverage']:.4f}, FNR bound {bound:.4f} "
            f"on {thresholds['n_exited_positives']} exited positives"
            + ("; a replay from the stored predictions arrives at the same threshold and counts" if replayed else "")
        )
    return GateVerdict("thresholds_certified", certified and not problems, message, figures)


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


#: Valid range of every metric evaluation reports (inclusive).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "mcc": (-1.0, 1.0), "ece": (0.0, 1.0),
    "nll": (0.0, math.inf), "brier": (0.0, 2.0), "augrc": (0.0, 0.5), "coverage": (0.0, 1.0),
    "coverage_at_deploy_prior": (0.0, 1.0), "fnr_on_exited": (0.0, 1.0), "fnr_on_exited_cp_upper": (0.0, 1.0),
    "exit_accuracy": (0.0, 1.0),
    "classwise_ece": (0.0, 1.0), "rejection_rate": (0.0, 1.0), "average_set_size": (0.0, 2.0),
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
    current: Mapping[str, np.ndarray],
    previous: Mapping[str, np.ndarray],
    previous_phase: str,
    accuracy_margin: float,
    coverage_margin: float,
    bootstrap: Mapping[str, Any],
) -> GateVerdict:
    """Non-inferiority of accuracy and coverage vs the previous phase, paired on the same val_test images.

    ``current`` / ``previous`` hold per-image 0/1 arrays ``correct`` and ``exit`` of the two fixed
    models and policies; ``bootstrap`` the paired bootstrap's ``n_resamples``, ``confidence``, ``seed``.
    """
    accuracy = paired_compare(current["correct"], previous["correct"], margin=accuracy_margin,
                              direction="non-inferiority", **bootstrap)
    coverage = paired_compare(current["exit"], previous["exit"], margin=coverage_margin,
                              direction="non-inferiority", **bootstrap)
    return paired_verdict("no_regression_vs_previous_phase",
                          [("accuracy", f"val_test accuracy vs {previous_phase}", *accuracy),
                           ("coverage", f"val_test coverage vs {previous_phase}", *coverage)],
                          figures={"previous_phase": previous_phase})


# ----- readers ---------------------------------------------------------------------------


def accuracy_baseline(ctx: StepContext, split: str) -> tuple[np.ndarray | None, float | None, str]:
    """``(per-image predictions, fixed accuracy, source)`` of the accuracy baseline on ``split``.

    ``baseline_val_accuracy`` from config (an old script's figure: no per-image predictions), else
    a logistic probe fit on the train features and predicting ``split``'s features.
    """
    from stage1_core.baselines import logistic_probe_predictions
    from stage1_core.data.splits import require_role
    from stage1_core.steps.backbone import load_split
    from stage1_core.steps.data import read_splits

    cfg = ctx.cfg
    if cfg.baseline_val_accuracy is not None:
        return None, float(cfg.baseline_val_accuracy), "baseline_val_accuracy from config"
    train = load_split(ctx.layout, ctx.partition, "train")
    require_role(train.sample_ids, "fit", read_splits(ctx.layout)[0], "the accuracy baseline's training rows")
    x = load_split(ctx.layout, ctx.partition, split).features
    predictions = logistic_probe_predictions(train.features.numpy(), train.labels.numpy(), x.numpy(), seed=cfg.seed,
                                             class_weighting=cfg.class_weighting)
    weighting = "class-weighted " if cfg.class_weighting == "balanced" else ""
    return predictions, None, f"{weighting}logistic-regression probe on the cached features"


def policy_document(ctx: StepContext) -> tuple[dict[str, Any] | None, list[str]]:
    from stage1_core.policies import policy_class

    ctx.require("exit_policy-check", [("exit_policy", ctx.partition)])
    name = ctx.cfg.exit_policy
    path = policy_path(ctx.layout, ctx.partition, name)
    try:
        doc = read_json(path)
    except ArtifactError as exc:
        return None, [str(exc)]
    return doc, schema_errors(doc, policy_class(name).schema)


@reader("training_completed")
def _training_completed(ctx: StepContext) -> GateVerdict:
    training = training_record(ctx)
    exists = (ctx.layout.path("checkpoint", ctx.partition) / training["best_checkpoint"]).is_file()
    return check_training_completed(training["history"], exists)


@reader("val_accuracy_vs_baseline")
def _val_accuracy(ctx: StepContext) -> GateVerdict:
    evaluation_record(ctx)
    outcomes = val_test_outcomes(ctx, ctx.partition)
    labels = outcomes["labels"].astype(int)
    predictions = np.where(outcomes["correct"] > 0, labels, 1 - labels)
    baseline, fixed, source = accuracy_baseline(ctx, "val_test")
    return check_val_accuracy_vs_baseline(labels, predictions, baseline, fixed, source,
                                          float(ctx.cfg.baseline_margin), bootstrap_settings(ctx))


@reader("selected_checkpoint_is_best")
def _selected_is_best(ctx: StepContext) -> GateVerdict:
    training = training_record(ctx)
    return check_selected_checkpoint_is_best(training["history"], training["best_epoch"], ctx.cfg.selection_metric)


@reader("thresholds_certified")
def _thresholds_certified(ctx: StepContext) -> GateVerdict:
    from stage1_core.policies import policy_class

    doc, problems = policy_document(ctx)
    policy = policy_class(ctx.cfg.exit_policy)
    replayed = replay_certificate(ctx) if doc is not None and not problems else None
    return check_thresholds_certified(doc, problems, policy.threshold_key, policy.bound_key, replayed)


def replay_certificate(ctx: StepContext) -> dict[str, Any]:
    """The policy document the phase's policy class fits again from the stored predictions (scratch directory)."""
    import tempfile
    from pathlib import Path

    from stage1_core.policies import policy_class
    from stage1_core.steps.policy import fit_inputs

    cls = policy_class(ctx.cfg.exit_policy)
    with tempfile.TemporaryDirectory(prefix="replay_") as scratch:
        return dict(cls.fit(fit_inputs(ctx, cls.fit_splits(ctx.cfg), Path(scratch))).document)


@reader("val_test_fnr_bound")
def _val_test_fnr(ctx: StepContext) -> GateVerdict:
    evaluation = evaluation_record(ctx)
    return check_test_fnr(
        evaluation["n_exited_positives"], evaluation["n_false_negatives"], evaluation["target_fnr_exit"],
        evaluation["delta"], mode=evaluation["val_test_check"], alpha=evaluation["val_test_alpha"],
        bootstrap_ci=evaluation.get("fnr_on_exited_ci"),
    )


@reader("selective_metrics_recomputed")
def _selective_recomputed(ctx: StepContext) -> GateVerdict:
    """Recomputed from the probabilities the deployed policy answers from (for SCRC the
    Dirichlet-calibrated q that evaluation reports), independently of the evaluation step."""

    evaluation_record(ctx)
    rows = {r["metric"]: r["value"] for r in read_metrics_csv(ctx.layout, ctx.partition)}
    probs, labels = deployed_probabilities(ctx, "val_test")
    residuals = (probs.argmax(1) != labels).astype(float)
    return check_selective_metrics_recomputed(rows, probs.max(1), residuals)


@reader("metrics_in_range")
def _metrics_in_range(ctx: StepContext) -> GateVerdict:
    evaluation_record(ctx)
    return check_metrics_in_range(read_metrics_csv(ctx.layout, ctx.partition))


@reader("no_regression_vs_previous_phase")
def _no_regression(ctx: StepContext) -> GateVerdict:
    evaluation_record(ctx)
    previous = ctx.reference_phase()
    if previous is None:
        return GateVerdict("no_regression_vs_previous_phase", False,
                           f"no earlier phase of {ctx.partition} has an evaluation to compare with", {})
    current, before = paired_val_test(ctx, previous)
    return check_no_regression(current, before, previous, float(ctx.cfg.accuracy_margin),
                               float(ctx.cfg.coverage_margin), bootstrap_settings(ctx))