"""Gate criteria, registered by name: each reads the artifacts of a phase and returns a verdict.

``phases.CRITERIA`` names every criterion and the asset it judges; this module registers one
function per name (``@criterion("...")``). The Dagster check layer, the pipeline and the phase
table therefore share one list, and a name without a function fails the import test
(``tests/unit/test_criteria.py``). The decisions themselves are the pure functions of
:mod:`stage1_core.gates`; these wrappers only gather their inputs from the files, and judge
against the figures stored in the certificate, never the live config.

Every verdict is also written to ``gates/<phase>/<criterion>.json`` with the lineage id of the
asset it judged, so ``stage1 summary`` can name failing criteria without the Dagster instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from stage1_core import gates
from stage1_core.artifacts import ArtifactError, read_json, schema_errors, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.gates import GateVerdict
from stage1_core.lineage import read_record, record_path
from stage1_core.phases import CRITERIA, PHASES, phase_number
from stage1_core.steps.context import Layout, StepContext

CriterionFn = Callable[[StepContext], GateVerdict]
REGISTRY: dict[str, CriterionFn] = {}


def criterion(name: str) -> Callable[[CriterionFn], CriterionFn]:
    """Register the function deciding criterion ``name`` (must be a name in ``phases.CRITERIA``)."""

    def wrap(fn: CriterionFn) -> CriterionFn:
        if name not in CRITERIA:
            raise ValueError(f"criterion {name!r} is not in phases.CRITERIA")
        REGISTRY[name] = fn
        return fn

    return wrap


def not_applicable(name: str, partition: str) -> GateVerdict:
    return GateVerdict(name, True, f"not applicable: not a criterion of {partition}", {"applicable": False})


def evaluate_criterion(name: str, config: Stage1ProConfig, layout: Layout, partition: str) -> GateVerdict:
    """Decide one criterion for ``partition``; any error becomes a failed verdict naming it."""
    recipe = PHASES[phase_number(partition)]
    if name not in {c.name for c in recipe.criteria}:
        return not_applicable(name, partition)
    try:
        ctx = StepContext(config, layout, partition)
        verdict = REGISTRY[name](ctx)
    except Exception as exc:  # noqa: BLE001 - a check always yields a verdict
        verdict = GateVerdict(name, False, f"could not be evaluated: {type(exc).__name__}: {exc}", {"error": True})
    record_verdict(layout, partition, verdict)
    return verdict


def record_verdict(layout: Layout, partition: str, verdict: GateVerdict) -> None:
    """Keep the verdict next to the artifacts, with the lineage id of the asset it judged."""
    asset = CRITERIA[verdict.criterion].asset if verdict.criterion in CRITERIA else None
    judged = None
    if asset is not None:
        directory = layout.path(asset, partition)
        if record_path(directory).is_file():
            try:
                judged = read_record(directory, asset, partition).id
            except (ValueError, KeyError):
                judged = None
    doc = {**asdict(verdict), "figures": _jsonable(verdict.figures), "judged_id": judged, "asset": asset}
    write_json(layout.dir("gates", partition) / f"{verdict.criterion}.json", doc)


def read_verdicts(layout: Layout, partition: str) -> dict[str, dict[str, Any]]:
    directory = layout.path("gates", partition)
    if not directory.is_dir():
        return {}
    return {p.stem: read_json(p) for p in sorted(directory.glob("*.json"))}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ----- the criteria -------------------------------------------------------------------------------


def _training(ctx: StepContext) -> dict[str, Any]:
    from stage1_core.steps.training import read_training

    ctx.require("checkpoint-check", [("checkpoint", ctx.partition)])
    return read_training(ctx.layout, ctx.partition)


@criterion("training_completed")
def _training_completed(ctx: StepContext) -> GateVerdict:
    training = _training(ctx)
    exists = (ctx.layout.path("checkpoint", ctx.partition) / training["best_checkpoint"]).is_file()
    return gates.check_training_completed(training["history"], exists)


@criterion("val_accuracy_vs_baseline")
def _val_accuracy(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.backbone import load_split

    training = _training(ctx)
    baseline, source = baseline_accuracy(ctx)
    labels = load_split(ctx.layout, ctx.partition, "val_select").labels.numpy()
    majority = float(max(labels.mean(), 1.0 - labels.mean()))
    return gates.check_val_accuracy_vs_baseline(training["best_val_accuracy"], baseline, source, majority)


@criterion("selected_checkpoint_is_best")
def _selected_is_best(ctx: StepContext) -> GateVerdict:
    training = _training(ctx)
    return gates.check_selected_checkpoint_is_best(training["history"], training["best_epoch"], ctx.cfg.selection_metric)


def _policy_document(ctx: StepContext) -> tuple[dict[str, Any] | None, list[str]]:
    from stage1_core.policies import policy_class
    from stage1_core.steps.policy import policy_path

    ctx.require("exit_policy-check", [("exit_policy", ctx.partition)])
    name = ctx.cfg.exit_policy
    path = policy_path(ctx.layout, ctx.partition, name)
    try:
        doc = read_json(path)
    except ArtifactError as exc:
        return None, [str(exc)]
    return doc, schema_errors(doc, policy_class(name).schema)


@criterion("thresholds_certified")
def _thresholds_certified(ctx: StepContext) -> GateVerdict:
    doc, problems = _policy_document(ctx)
    return gates.check_thresholds_certified(doc, problems)


def _evaluation(ctx: StepContext) -> dict[str, Any]:
    from stage1_core.steps.evaluation import EVALUATION_FILE

    ctx.require("evaluation-check", [("evaluation", ctx.partition)])
    return read_json(ctx.layout.path("evaluation", ctx.partition) / EVALUATION_FILE, schema="evaluation")


@criterion("val_test_fnr_bound")
def _val_test_fnr(ctx: StepContext) -> GateVerdict:
    evaluation = _evaluation(ctx)
    return gates.check_test_fnr(
        evaluation["n_exited_positives"], evaluation["n_false_negatives"], evaluation["fnr_target"],
        evaluation["delta"], mode=evaluation["val_test_check"], alpha=evaluation["val_test_alpha"],
        bootstrap_ci=evaluation.get("fnr_on_exited_ci"),
    )


@criterion("selective_metrics_recomputed")
def _selective_recomputed(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.evaluation import read_metrics_csv
    from stage1_core.steps.training import load_predictions

    _evaluation(ctx)
    rows = {r["metric"]: r["value"] for r in read_metrics_csv(ctx.layout, ctx.partition)}
    probs, labels = load_predictions(ctx.layout, ctx.partition, "val_test")
    residuals = (probs.argmax(1) != labels).astype(float)
    return gates.check_selective_metrics_recomputed(rows, probs.max(1), residuals)


@criterion("metrics_in_range")
def _metrics_in_range(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.evaluation import read_metrics_csv

    _evaluation(ctx)
    return gates.check_metrics_in_range(read_metrics_csv(ctx.layout, ctx.partition))


@criterion("no_regression_vs_previous_phase")
def _no_regression(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.evaluation import EVALUATION_FILE
    from stage1_core.steps.policy import read_policy_document

    number = phase_number(ctx.partition)
    previous = reference_phase(ctx.layout, number)
    if previous is None:
        return GateVerdict("no_regression_vs_previous_phase", False,
                           f"no earlier phase of {ctx.partition} has an evaluation to compare with", {})
    cur = _evaluation(ctx)
    prev = read_json(ctx.layout.path("evaluation", previous) / EVALUATION_FILE, schema="evaluation")
    prev_cov = read_policy_document(ctx.layout, previous, prev["policy"])["coverage"]
    cur_cov = read_policy_document(ctx.layout, ctx.partition, ctx.cfg.exit_policy)["coverage"]
    verdict = gates.check_no_regression({"accuracy": prev["accuracy"], "coverage": prev_cov},
                                        {"accuracy": cur["accuracy"], "coverage": cur_cov})
    return GateVerdict(verdict.criterion, verdict.passed, f"vs {previous}: {verdict.message}",
                       {**verdict.figures, "previous_phase": previous})


def reference_phase(layout: Layout, number: int) -> str | None:
    """The phase a regression is measured against: the latest earlier phase with an evaluation.

    Phase 5 is optional, so phase 6 compares with phase 5 only when phase 5 was evaluated.
    """
    for earlier in range(number - 1, 0, -1):
        key = PHASES[earlier].key
        if (layout.path("evaluation", key) / "evaluation.json").is_file():
            return key
    return None


@criterion("bundle_verified")
def _bundle_verified(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.bundle import bundle_dir, compare_bundle_decisions

    record = ctx.current(f"bundle[{ctx.partition}]")
    expected = record.extra.get("bundle_id") if record else None
    problems, compared, mismatched = compare_bundle_decisions(
        bundle_dir(ctx.layout, ctx.partition), ctx.layout, ctx.partition, expected_id=expected
    )
    return gates.check_bundle_verified(problems, compared, mismatched)


def baseline_accuracy(ctx: StepContext) -> tuple[float, str]:
    """The accuracy baseline: config's baseline_val_accuracy, else a logistic probe on the features."""
    from stage1_core.baselines import logistic_probe_accuracy
    from stage1_core.steps.backbone import load_split_features

    cfg = ctx.cfg
    if cfg.baseline_val_accuracy is not None:
        return float(cfg.baseline_val_accuracy), "baseline_val_accuracy from config"
    train_x, train_y = load_split_features(ctx.layout, ctx.partition, "train")
    val_x, val_y = load_split_features(ctx.layout, ctx.partition, "val_select")
    accuracy = logistic_probe_accuracy(
        train_x.numpy(), train_y.numpy(), val_x.numpy(), val_y.numpy(), seed=cfg.seed,
        class_weighting=cfg.class_weighting,
    )
    weighting = "class-weighted " if cfg.class_weighting == "balanced" else ""
    return accuracy, f"{weighting}logistic-regression probe on the cached features"


@criterion("gate_trains")
def _gate_trains(ctx: StepContext) -> GateVerdict:
    """Judged on the checkpoint itself (predictions do not exist yet when checkpoint checks run)."""
    from scipy import special

    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.policies import SoftmaxExitPolicy
    from stage1_core.steps.backbone import load_split
    from stage1_core.steps.training import load_head

    training = _training(ctx)
    data = load_split(ctx.layout, ctx.partition, "val_select")
    predictor = Stage1Predictor(load_head(ctx.layout, ctx.partition), SoftmaxExitPolicy(None))
    logits, raw = predictor.head_outputs_from_features(data.features)
    if raw is None:
        return GateVerdict("gate_trains", False, "the checkpoint has no gate head", {})
    correct = logits.argmax(1) == data.labels.numpy()
    return gates.check_gate_trains(bool(training["losses_finite"]), special.expit(raw), correct)


def _gate_comparison(ctx: StepContext) -> dict[str, Any]:
    comparison = _evaluation(ctx).get("gate_comparison")
    if comparison is None:
        raise ValueError(f"evaluation[{ctx.partition}] holds no gate comparison (is its policy the gate policy?)")
    return comparison


@criterion("gate_beats_softmax")
def _gate_beats_softmax(ctx: StepContext) -> GateVerdict:
    c = _gate_comparison(ctx)
    return gates.check_gate_beats_softmax(c["gate"]["coverage"], c["softmax"]["coverage"], c["coverage_gain"],
                                          float(ctx.cfg.gate_min_gain))


@criterion("no_classification_regression")
def _no_classification_regression(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.training import read_training

    c = _gate_comparison(ctx)
    previous = reference_phase(ctx.layout, phase_number(ctx.partition))
    if previous is None:
        return GateVerdict("no_classification_regression", False, "no earlier phase to compare with", {})
    current = read_training(ctx.layout, ctx.partition)["best_val_accuracy"]
    before = read_training(ctx.layout, previous)["best_val_accuracy"]
    return gates.check_no_classification_regression(current, before, previous, c["gate"]["exit_accuracy"],
                                                    c["softmax"]["exit_accuracy"])


@criterion("gate_calibration_improves")
def _gate_calibration_improves(ctx: StepContext) -> GateVerdict:
    return gates.check_gate_calibration_improves(_gate_comparison(ctx)["calibration"])
