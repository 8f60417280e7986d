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
from pathlib import Path
from typing import Any

import math

import numpy as np

from stage1_core import gates
from stage1_core.artifacts import ArtifactError, read_json, schema_errors, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.gates import GateVerdict
from stage1_core.lineage import read_record, record_path
from stage1_core.locking import default_timeout, lock_scope, path_lock
from stage1_core.phases import CRITERIA, PHASES, phase_number
from stage1_core.steps.context import Layout, StepContext

CriterionFn = Callable[[StepContext], GateVerdict]
REGISTRY: dict[str, CriterionFn] = {}


def criterion(name: str) -> Callable[[CriterionFn], CriterionFn]:
    """Register the function deciding criterion ``name`` (must be a name in ``phases.CRITERIA``)."""

    def wrap(fn: CriterionFn) -> CriterionFn:
        if name not in CRITERIA:
            raise ValueError(f"criterion {name!r} is not in phases.CRITERIA")
        if name in REGISTRY:
            raise ValueError(f"criterion {name!r} is registered twice ({REGISTRY[name].__name__} and {fn.__name__})")
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
    with lock_scope():  # the inputs the criterion reads stay locked until its verdict is written
        try:
            ctx = StepContext(config, layout, partition)
            verdict = REGISTRY[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a check always yields a verdict
            verdict = GateVerdict(name, False, f"could not be evaluated: {type(exc).__name__}: {exc}", {"error": True})
        record_verdict(layout, partition, verdict)
    return verdict


def _current_id(layout: Layout, asset: str, partition: str) -> str | None:
    """Lineage id of the asset partition's current materialisation (None when it has no valid record)."""
    directory = layout.path(asset, partition)
    if not record_path(directory).is_file():
        return None
    try:
        return read_record(directory, asset, partition).id
    except (ValueError, KeyError):
        return None


def record_verdict(layout: Layout, partition: str, verdict: GateVerdict) -> None:
    """Keep the verdict next to the artifacts, with the lineage id of the asset it judged."""
    asset = CRITERIA[verdict.criterion].asset if verdict.criterion in CRITERIA else None
    judged = _current_id(layout, asset, partition) if asset is not None else None
    doc = {**asdict(verdict), "figures": _jsonable(verdict.figures), "judged_id": judged, "asset": asset}
    path = layout.dir("gates", partition) / f"{verdict.criterion}.json"
    with path_lock(gate_lock_path(path), f"gate verdict {verdict.criterion}", partition, timeout=default_timeout()):
        write_json(path, doc)


def gate_lock_path(verdict_file: Path) -> Path:
    """The lock of one gate verdict file: ``gates/<phase>/.<criterion>.lock``."""
    return verdict_file.parent / f".{verdict_file.stem}.lock"


def read_verdicts(layout: Layout, partition: str, current_only: bool = True) -> dict[str, dict[str, Any]]:
    """The recorded verdicts of ``partition``'s criteria, by name.

    With ``current_only`` a verdict on an asset that has since been re-materialised (its lineage
    id is no longer the one judged), or removed, is left out: it judged something that is gone,
    so a run that stopped before re-judging it must not show its old verdict. (A verdict recorded
    when its asset had no record, and the asset still has none, is kept.)
    """
    directory = layout.path("gates", partition)
    if not directory.is_dir():
        return {}
    verdicts = {p.stem: read_json(p) for p in sorted(directory.glob("*.json"))}
    if not current_only:
        return verdicts
    assets = {v["asset"] for v in verdicts.values() if v.get("asset") is not None}
    current = {asset: _current_id(layout, asset, partition) for asset in assets}
    return {name: v for name, v in verdicts.items()
            if v.get("asset") is None or v.get("judged_id") == current[v["asset"]]}


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


def reference_phase(layout: Layout, number: int, asset: str = "evaluation") -> str | None:
    """The phase a regression is measured against: the latest earlier phase with that asset.

    Phase 5 is optional, so phase 6 compares with phase 5 only when phase 5 was evaluated and is
    not skipped (a skipped phase is never a reference, whatever it left behind).
    """
    from stage1_core.lineage import record_path
    from stage1_core.phase_state import read_skip

    for earlier in range(number - 1, 0, -1):
        key = PHASES[earlier].key
        if PHASES[earlier].optional and read_skip(layout, key) is not None:
            continue
        if record_path(layout.path(asset, key)).is_file():
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
                                                    c["softmax"]["exit_accuracy"],
                                                    exit_accuracy_ci=c.get("exit_accuracy_difference"),
                                                    rule=ctx.cfg.exit_accuracy_check)


@criterion("gate_calibration_improves")
def _gate_calibration_improves(ctx: StepContext) -> GateVerdict:
    return gates.check_gate_calibration_improves(_gate_comparison(ctx)["calibration"])


# ----- phase 4 and 5 -----------------------------------------------------------------------------


@criterion("explora_pretraining_completed")
def _explora_pretraining(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.backbone import read_backbone

    ctx.require("backbone-check", [("backbone", ctx.partition)])
    explora = read_backbone(ctx.layout, ctx.partition).get("explora")
    if explora is None:
        return GateVerdict("explora_pretraining_completed", False,
                           f"backbone[{ctx.partition}] was not adapted with ExPLoRA (no record of it)", {})
    return gates.check_explora_pretraining(bool(explora["losses_finite"]), explora["gain"])


@criterion("peft_applied_correctly")
def _peft_applied(ctx: StepContext) -> GateVerdict:
    peft = _training(ctx).get("peft")
    if peft is None:
        return GateVerdict("peft_applied_correctly", False,
                           f"checkpoint[{ctx.partition}] did not fine-tune backbone adapters (no PEFT record)", {})
    return gates.check_peft_applied(peft["init"], peft["final"])


def _certified_coverage(ctx: StepContext, partition: str) -> float:
    from stage1_core.steps.evaluation import EVALUATION_FILE
    from stage1_core.steps.policy import read_policy_document

    policy = read_json(ctx.layout.path("evaluation", partition) / EVALUATION_FILE, schema="evaluation")["policy"]
    return float(read_policy_document(ctx.layout, partition, policy)["coverage"])


@criterion("performance_maintained")
def _performance_maintained(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.training import read_training

    _evaluation(ctx)
    previous = reference_phase(ctx.layout, phase_number(ctx.partition))
    if previous is None:
        return GateVerdict("performance_maintained", False, f"no earlier phase of {ctx.partition} to compare with", {})
    current = {"accuracy": _training(ctx)["best_val_accuracy"], "coverage": _certified_coverage(ctx, ctx.partition)}
    before = {"accuracy": read_training(ctx.layout, previous)["best_val_accuracy"],
              "coverage": _certified_coverage(ctx, previous)}
    return gates.check_performance_maintained(current, before, previous)


@criterion("no_memory_issues")
def _no_memory_issues(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.training import read_training

    training = _training(ctx)
    memory = training.get("memory") or {}
    peak = memory.get("peak_cuda_gb") if memory.get("peak_cuda_gb") is not None else memory.get("peak_rss_gb")
    reference = None
    previous = reference_phase(ctx.layout, phase_number(ctx.partition), asset="checkpoint")
    if previous is not None:
        ref_memory = read_training(ctx.layout, previous).get("memory") or {}
        ref_peak = ref_memory.get("peak_cuda_gb") if ref_memory.get("peak_cuda_gb") is not None else ref_memory.get("peak_rss_gb")
        reference = {"phase": previous, "peak_gb": ref_peak}
    return gates.check_no_memory_issues(training.get("oom_fallback"), peak, float(memory.get("budget_gb", math.inf)),
                                        reference)


@criterion("training_stable")
def _training_stable(ctx: StepContext) -> GateVerdict:
    training = _training(ctx)
    return gates.check_training_stable(training.get("step_losses", []), training.get("grad_norms", []),
                                       float(training["loss_spike_factor"]))


@criterion("improves_over_adamw")
def _improves_over_adamw(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.training import read_training
    from stage1_core.training.trainer import SELECTION_METRICS

    _evaluation(ctx)
    training = _training(ctx)
    previous = reference_phase(ctx.layout, phase_number(ctx.partition))
    if previous is None:
        return GateVerdict("improves_over_adamw", False, f"no AdamW reference phase of {ctx.partition} was evaluated", {})
    before = read_training(ctx.layout, previous)
    if before.get("optimizer", "adamw") != "adamw" or before["selection_metric"] != training["selection_metric"]:
        return GateVerdict("improves_over_adamw", False,
                           f"{previous} is not an AdamW run with the same selection metric, so it is no reference", {})
    metric = training["selection_metric"]
    current = {"selection_value": training["best_metric"], "coverage": _certified_coverage(ctx, ctx.partition),
               "optimizer": training.get("optimizer")}
    reference = {"selection_value": before["best_metric"], "coverage": _certified_coverage(ctx, previous),
                 "phase": previous, "optimizer": before.get("optimizer", "adamw")}
    return gates.check_improves_over_adamw(current, reference, metric, SELECTION_METRICS[metric])


# ----- phase 6 ---------------------------------------------------------------------------------


def _scrc_policy(ctx: StepContext):
    """``(scrcparams document, SCRCExitPolicy)`` of the phase; ValueError when its policy is not SCRC."""
    from stage1_core.policies import load_policy
    from stage1_core.steps.policy import policy_path, read_policy_document

    if ctx.cfg.exit_policy != "scrc":
        raise ValueError(f"{ctx.partition} deploys the {ctx.cfg.exit_policy!r} policy, not SCRC")
    return (read_policy_document(ctx.layout, ctx.partition, "scrc"),
            load_policy("scrc", policy_path(ctx.layout, ctx.partition, "scrc")))


def _scrc_comparison(ctx: StepContext) -> dict[str, Any]:
    comparison = _evaluation(ctx).get("scrc_comparison")
    if comparison is None:
        raise ValueError(f"evaluation[{ctx.partition}] holds no SCRC comparison (is its policy SCRC?)")
    return comparison


def deployed_probabilities(ctx: StepContext, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, labels)`` the deployed policy answers from on ``split``: SCRC's calibrated q, else the softmax."""
    from stage1_core.steps.training import load_prediction_outputs

    probs, raw, labels = load_prediction_outputs(ctx.layout, ctx.partition, split)
    if ctx.cfg.exit_policy == "scrc":
        probs = _scrc_policy(ctx)[1].calibrated(probs, raw)[0]
    return probs, labels


@criterion("selective_metrics_recomputed")
def _selective_recomputed(ctx: StepContext) -> GateVerdict:
    """Recomputed from the probabilities the deployed policy answers from (for SCRC the
    Dirichlet-calibrated q that evaluation reports), independently of the evaluation step."""
    from stage1_core.steps.evaluation import read_metrics_csv

    _evaluation(ctx)
    rows = {r["metric"]: r["value"] for r in read_metrics_csv(ctx.layout, ctx.partition)}
    probs, labels = deployed_probabilities(ctx, "val_test")
    residuals = (probs.argmax(1) != labels).astype(float)
    return gates.check_selective_metrics_recomputed(rows, probs.max(1), residuals)


@criterion("risk_training_works")
def _risk_training_works(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.training import read_training

    _evaluation(ctx)
    training = read_training(ctx.layout, ctx.partition)
    from stage1_core.steps.backbone import previous_backbone_phase

    previous = previous_backbone_phase(ctx.layout, ctx.partition)
    if not (ctx.layout.path("evaluation", previous) / "evaluation.json").is_file():
        return GateVerdict("risk_training_works", False,
                           f"{previous} has no evaluation, so there is no model to compare conformal risk training with", {})
    return gates.check_risk_training_works(training["history"], bool(training["losses_finite"]),
                                           _certified_coverage(ctx, ctx.partition), _certified_coverage(ctx, previous),
                                           previous)


@criterion("coverage_maximised")
def _coverage_maximised(ctx: StepContext) -> GateVerdict:
    from stage1_core.artifacts import load_tensors
    from stage1_core.steps.evaluation import DECISIONS_FILE
    from stage1_core.steps.training import load_prediction_outputs

    comparison = _scrc_comparison(ctx)
    doc, policy = _scrc_policy(ctx)
    probs, raw, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_calib")
    q, g = policy.calibrated(probs, raw)
    if doc["scrc_variant"] == "SCRC-I":
        recomputed = gates.recompute_scrc_inductive(doc, g, q, labels)
    else:
        t_probs, t_raw, _ = load_prediction_outputs(ctx.layout, ctx.partition, "val_test")
        q_t, g_t = policy.calibrated(t_probs, t_raw)
        exits = load_tensors(ctx.layout.path("evaluation", ctx.partition) / DECISIONS_FILE)["exit"].numpy()
        recomputed = gates.recompute_scrc_transductive(doc, g, q, labels, g_t, q_t, exits)
    return gates.check_coverage_maximised(recomputed, comparison)


@criterion("prediction_sets_valid")
def _prediction_sets_valid(ctx: StepContext) -> GateVerdict:
    from stage1_core.artifacts import load_tensors
    from stage1_core.steps.evaluation import DECISIONS_FILE
    from stage1_core.steps.training import load_prediction_outputs

    comparison = _scrc_comparison(ctx)
    _, policy = _scrc_policy(ctx)
    probs, raw, _ = load_prediction_outputs(ctx.layout, ctx.partition, "val_test")
    q, g = policy.calibrated(probs, raw)
    exits = load_tensors(ctx.layout.path("evaluation", ctx.partition) / DECISIONS_FILE)["exit"].numpy()
    from stage1_core.calibration.scrc import prediction_sets

    sets = comparison["sets"]
    members = np.stack([prediction_sets(q, lam) for lam in gates.lambda2_grid(comparison["lambda2"])])
    return gates.check_prediction_sets_valid(members, q, g, comparison["lambda1"], comparison["lambda2"], exits,
                                             sets["positive_set_coverage"], sets["positive_set_coverage_target"])
