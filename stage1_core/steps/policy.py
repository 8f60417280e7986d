"""Exit-policy step: fit the recipe's policy on val_calib only, and build the deployable predictor.

Each policy kind has a fitter in :data:`POLICY_FITTERS` (``name -> fitter(ctx, inputs)``) that
returns the policy document and its figures; this step writes exactly one policy file (the
policy's ``policy_file``) and removes any other policy file left in the directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stage1_core.artifacts import write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.splits import require_split
from stage1_core.policies import POLICIES, load_policy, policy_class
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.training import load_head, load_prediction_outputs, read_training


@dataclass
class FittedPolicy:
    """A fitter's output: the policy file's content, its headline figures and figures."""

    document: dict[str, Any]
    metadata: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


Fitter = Callable[[StepContext, Path], FittedPolicy]
POLICY_FITTERS: dict[str, Fitter] = {}


def register_fitter(name: str) -> Callable[[Fitter], Fitter]:
    def wrap(fitter: Fitter) -> Fitter:
        POLICY_FITTERS[name] = fitter
        return fitter

    return wrap


def calib_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    from stage1_core.metrics.calibration import compute_ece
    from stage1_core.metrics.classification import accuracy, mcc

    preds = probs.argmax(1)
    return {"accuracy": accuracy(labels, preds), "mcc": mcc(labels, preds), "ece": compute_ece(probs, labels),
            "n": int(len(labels)), "positive_rate": float(labels.mean())}


@register_fitter("softmax")
def fit_softmax(ctx: StepContext, out_dir: Path) -> FittedPolicy:
    """Certify exit iff max(p) >= t on val_calib (never a default threshold)."""
    from stage1_core.calibration.threshold_sweep import certify_softmax_threshold, thresholds_document
    from stage1_core.metrics.exit import coverage_at_prior
    from stage1_core.policies import SoftmaxExitPolicy
    from stage1_core.reporting.figures import plot_threshold_sweep

    cfg = ctx.cfg
    probs, _, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_calib")
    result = certify_softmax_threshold(probs, labels, cfg.target_fnr_exit, cfg.delta)
    decisions = SoftmaxExitPolicy(result.exit_threshold).decide(probs)
    doc = thresholds_document(
        result,
        val_calib_metrics=calib_metrics(probs, labels),
        checkpoint_id=read_training(ctx.layout, ctx.partition)["checkpoint_id"],
        deploy_prior=cfg.deploy_prior,
        coverage_at_deploy_prior=float(coverage_at_prior(decisions.exit, labels, cfg.deploy_prior)),
    )
    figure = plot_threshold_sweep(result, cfg.target_fnr_exit, out_dir / "threshold_sweep.png")
    metadata = {
        "certified": bool(result.certified), "exit_threshold": result.exit_threshold,
        "coverage": float(result.coverage), "fnr_upper_bound": float(result.fnr_upper_bound),
        "n_exited_positives": int(result.n_exited_positives), "method": result.method,
        "reason": result.reason, "coverage_at_deploy_prior": doc["coverage_at_deploy_prior"],
    }
    return FittedPolicy(doc, metadata, {"threshold sweep (val_calib)": figure},
                        {"seed_grid": list(doc["grid_results"])})


def policy_path(layout: Layout, partition: str, name: str) -> Path:
    return layout.path("exit_policy", partition) / policy_class(name).policy_file


def fit_exit_policy(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Fit the recipe's exit policy on val_calib and write its one policy file."""
    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("exit_policy", [("predictions", partition), ("checkpoint", partition)])
    require_split("val_calib", "calibrate")
    name = ctx.cfg.exit_policy
    if name not in POLICY_FITTERS:
        raise ValueError(f"exit policy {name!r} has no fitter; known: {sorted(POLICY_FITTERS)}")
    out_dir = layout.dir("exit_policy", partition)
    fitted = POLICY_FITTERS[name](ctx, out_dir)
    cls = policy_class(name)
    for other in POLICIES.values():
        if other.policy_file != cls.policy_file:
            (out_dir / other.policy_file).unlink(missing_ok=True)
    path = write_json(out_dir / cls.policy_file, fitted.document, schema=cls.schema)
    record = ctx.finish("exit_policy", [cls.policy_file], inputs,
                        extra={"policy": name, "target_fnr": fitted.document["target_fnr"],
                               "delta": fitted.document["delta"]})
    metadata = {"path": path, "policy": name, "lineage_id": record.id, **fitted.metadata}
    return StepResult(path, metadata, tables=fitted.tables, figures=fitted.figures, record=record)


def read_policy_document(layout: Layout, partition: str, name: str) -> dict[str, Any]:
    from stage1_core.artifacts import read_json

    return read_json(policy_path(layout, partition, name), schema=policy_class(name).schema)


def build_predictor(config: Stage1ProConfig, layout: Layout, partition: str):
    """The same predictor object the bundle uses: head + policy file (+ backbone lazily)."""
    from stage1_core.bundle.predictor import Stage1Predictor

    ctx = StepContext(config, layout, partition)
    name = ctx.cfg.exit_policy
    return Stage1Predictor(load_head(layout, partition), load_policy(name, policy_path(layout, partition, name)))


@register_fitter("gate")
def fit_gate(ctx: StepContext, out_dir: Path) -> FittedPolicy:
    """Calibrate the gate score and certify exit iff calibrated score >= t on val_calib.

    The calibrator (``gate_calibration``) is fitted on val_select for isotonic (its tie blocks
    depend on the labels it sees, so fitting them on val_calib would let val_calib's labels shape
    the tested family) and on val_calib for Platt (a strictly increasing map leaves the family of
    candidate exit sets unchanged). The softmax policy is certified on the same checkpoint's
    val_calib logits for comparison.
    """
    from stage1_core.calibration.gate import gate_calibration_metrics
    from stage1_core.calibration.threshold_sweep import certify_softmax_threshold
    from stage1_core.metrics.exit import coverage_at_prior
    from stage1_core.policies import GateExitPolicy, SoftmaxExitPolicy, fit_gate_policy, gateparams_document
    from stage1_core.reporting.figures import plot_threshold_sweep

    cfg = ctx.cfg
    probs, raw, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_calib")
    if raw is None:
        raise ValueError(f"{ctx.partition}: the checkpoint has no gate head, so the gate policy cannot be fitted")
    fit_split = "val_select" if cfg.gate_calibration == "isotonic" else "val_calib"
    fit_data = None
    if fit_split == "val_select":
        require_split("val_select", "select")
        sel_probs, sel_raw, sel_labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_select")
        fit_data = (sel_raw, sel_probs, sel_labels)
    calibrator, result = fit_gate_policy(raw, probs, labels, cfg.target_fnr_exit, cfg.delta,
                                         calibrator_method=cfg.gate_calibration, calibrator_fit_data=fit_data)
    softmax = certify_softmax_threshold(probs, labels, cfg.target_fnr_exit, cfg.delta)
    gate_exits = GateExitPolicy(result.exit_threshold, calibrator).decide(probs, gate_scores=raw).exit
    soft_exits = SoftmaxExitPolicy(softmax.exit_threshold).decide(probs).exit
    doc = gateparams_document(
        result, calibrator, read_training(ctx.layout, ctx.partition)["checkpoint_id"], cfg.deploy_prior,
        float(coverage_at_prior(gate_exits, labels, cfg.deploy_prior)), softmax,
        float(coverage_at_prior(soft_exits, labels, cfg.deploy_prior)),
        val_calib_metrics={**calib_metrics(probs, labels),
                           **gate_calibration_metrics(raw, calibrator, probs.argmax(1), labels)},
        calibrator_fit_split=fit_split,
    )
    figure = plot_threshold_sweep(result, cfg.target_fnr_exit, out_dir / "threshold_sweep.png")
    metadata = {
        "certified": bool(result.certified), "gate_threshold": result.exit_threshold,
        "coverage": float(result.coverage), "fnr_upper_bound": float(result.fnr_upper_bound),
        "n_exited_positives": int(result.n_exited_positives), "method": result.method, "reason": result.reason,
        "calibrator": cfg.gate_calibration, "calibrator_fit_split": fit_split,
        "softmax_coverage": float(softmax.coverage), "coverage_gain_vs_softmax": doc["coverage_gain_vs_softmax"],
    }
    return FittedPolicy(doc, metadata, {"gate threshold sweep (val_calib)": figure})
