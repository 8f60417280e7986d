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
    #: Companion files the fitter wrote next to the policy file (names), recorded in its lineage.
    files: list[str] = field(default_factory=list)


Fitter = Callable[[StepContext, Path], FittedPolicy]
POLICY_FITTERS: dict[str, Fitter] = {}
#: Companion files a fitter may write beside its policy file (removed when a refit writes none).
COMPANION_FILES: tuple[str, ...] = ("scrc_calibration.pt", "served_calibrator.json")
#: The served-probability calibrator (deployment pipeline on), fit on val_select beside the policy.
SERVED_FILE = "served_calibrator.json"


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
    # Deployment pipeline: the probability served at the deployment prior (never fit on val_calib).
    from stage1_core.steps.deployment import deployment_enabled

    if deployment_enabled(ctx.cfg):
        fitted.files.append(SERVED_FILE)
        fitted.metadata.update(_fit_served(ctx, out_dir / SERVED_FILE))
    cls = policy_class(name)
    for other in POLICIES.values():
        if other.policy_file != cls.policy_file:
            (out_dir / other.policy_file).unlink(missing_ok=True)
    for stale in set(COMPANION_FILES) - set(fitted.files):
        (out_dir / stale).unlink(missing_ok=True)
    path = write_json(out_dir / cls.policy_file, fitted.document, schema=cls.schema)
    record = ctx.finish("exit_policy", [cls.policy_file, *fitted.files], inputs,
                        extra={"policy": name, "target_fnr": fitted.document["target_fnr"],
                               "delta": fitted.document["delta"]})
    metadata = {"path": path, "policy": name, "lineage_id": record.id, **fitted.metadata}
    return StepResult(path, metadata, tables=fitted.tables, figures=fitted.figures, record=record)


def _fit_served(ctx: StepContext, path: Path) -> dict[str, Any]:
    """Fit the served-probability calibrator on val_select's (deployment-view) outputs and write it."""
    from stage1_core.calibration.served import fit_served_calibrator

    require_split("val_select", "select")
    probs, _, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_select")
    spec = fit_served_calibrator(probs, labels, prior=ctx.cfg.deploy_prior, fit_split="val_select")
    write_json(path, spec)
    return {"served_calibrator_slope": spec["a"], "served_calibrator_intercept": spec["b"]}


def read_served(layout: Layout, partition: str) -> dict[str, Any] | None:
    """The phase's served-probability calibrator, or None (clean path: the policy's p is served)."""
    from stage1_core.artifacts import read_json

    path = layout.path("exit_policy", partition) / SERVED_FILE
    return read_json(path) if path.is_file() else None


def read_policy_document(layout: Layout, partition: str, name: str) -> dict[str, Any]:
    from stage1_core.artifacts import read_json

    return read_json(policy_path(layout, partition, name), schema=policy_class(name).schema)


def build_predictor(config: Stage1ProConfig, layout: Layout, partition: str):
    """The same predictor object the bundle uses: head + policy file (+ backbone lazily)."""
    from stage1_core.bundle.predictor import Stage1Predictor

    ctx = StepContext(config, layout, partition)
    name = ctx.cfg.exit_policy
    return Stage1Predictor(load_head(layout, partition), load_policy(name, policy_path(layout, partition, name)),
                           served=read_served(layout, partition))


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


def _special_case(result: Any, exits: np.ndarray, labels: np.ndarray, deploy_prior: float) -> dict[str, Any]:
    """A 1-D certificate as ``scrcparams.json`` records SCRC's special cases."""
    from stage1_core.metrics.exit import coverage_at_prior

    return {
        "exit_threshold": result.exit_threshold, "certified": bool(result.certified), "coverage": float(result.coverage),
        "coverage_at_deploy_prior": float(coverage_at_prior(exits, labels, deploy_prior)),
        "fnr_on_exits": result.fnr_on_exits, "fnr_upper_bound": float(result.fnr_upper_bound),
        "exit_accuracy": result.exit_accuracy, "n_exited_positives": int(result.n_exited_positives),
        "n_false_negatives": int(result.n_false_negatives), "method": result.method,
        "test_level": float(result.test_level), "reason": result.reason,
    }


def fit_scrc_calibrators(cfg: Stage1ProConfig, probs: np.ndarray, raw_gate: np.ndarray, labels: np.ndarray
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(calibrator, gate_calibrator)`` specs fit on val_select outputs (see calibration/scrc.py).

    Dirichlet (``use_dirichlet``; L-BFGS, ``calibration_iters`` iterations, ODIR ``dirichlet_lambda``
    / ``dirichlet_mu``) maps the softmax to ``q``; the gate calibrator (``gate_calibration``) maps
    the raw gate logit to the probability that the answer argmax q is correct.
    """
    from stage1_core.calibration.dirichlet import DirichletCalibrator
    from stage1_core.calibration.gate import GateCalibrator, gate_events

    require_split("val_select", "select")
    if cfg.use_dirichlet:
        dirichlet = DirichletCalibrator(cfg.dirichlet_lambda, cfg.dirichlet_mu, max_iter=cfg.calibration_iters)
        calibrator = dirichlet.fit(probs, labels).to_dict()
        q = dirichlet.predict_proba(probs)
    else:
        calibrator, q = {"method": "none"}, probs
    gate = GateCalibrator(cfg.gate_calibration, "correct").fit(raw_gate, gate_events(q.argmax(1), labels, "correct"))
    return calibrator, gate.to_dict()


@register_fitter("scrc")
def fit_scrc(ctx: StepContext, out_dir: Path) -> FittedPolicy:
    """SCRC (two-stage selective conformal risk control) on val_calib, calibrators fit on val_select.

    SCRC-I (``scrc_variant: I``) certifies the max-coverage (lambda1, lambda2) with the binomial
    LTT, over the candidate family (2-D frontier, gate-only or softmax-only) that certified the
    most coverage on val_select (``choose_order``); SCRC-T (``T``) records the selection rate (chosen on val_select), the reference thresholds
    of val_calib alone and a companion file with val_calib's outputs, from which every prediction
    batch recomputes its thresholds. Both also certify SCRC's special cases on the same calibrated
    scores for comparison: the gate policy (g >= t) and the softmax policy (max q >= t), answers
    argmax q.
    """
    from stage1_core.calibration.scrc import (
        MIN_TEST_BATCH, choose_order, choose_selection_rate, scrc_inductive, scrc_transductive, scrcparams_document,
    )
    from stage1_core.calibration.threshold_sweep import certify_score_threshold
    from stage1_core.metrics.exit import coverage_at_prior
    from stage1_core.policies.scrc import CALIBRATION_FILE, SCRCExitPolicy, save_calibration_outputs
    from stage1_core.reporting.scrc_figures import plot_scrc_frontier

    cfg = ctx.cfg
    sel_probs, sel_raw, sel_labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_select")
    probs, raw, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_calib")
    if raw is None or sel_raw is None:
        raise ValueError(f"{ctx.partition}: the checkpoint has no gate head, so the SCRC policy cannot be fitted "
                         f"(its stage 1 selects on the gate score); use a gated head (head_kind 'gated')")
    calibrator, gate_spec = fit_scrc_calibrators(cfg, sel_probs, sel_raw, sel_labels)
    identity = SCRCExitPolicy(None, None, calibrator, gate_spec)
    require_split("val_calib", "calibrate")
    q, g = identity.calibrated(probs, raw)
    target, delta = cfg.target_fnr_exit, cfg.delta
    files: list[str] = []
    transductive = None
    q_sel, g_sel = identity.calibrated(sel_probs, sel_raw)
    if cfg.scrc_variant == "I":
        order, order_rows = choose_order(g_sel, q_sel, sel_labels, target, delta)
        result = scrc_inductive(g, q, labels, target, delta, order=order)
        result.method_params["order_choice"] = {"split": "val_select", "families": order_rows}
    else:
        rate, rows = choose_selection_rate(g_sel, q_sel, sel_labels, target)
        result = scrc_transductive(g, q, labels, g[:0], q[:0], target, rate, min_test=0, delta=delta)
        save_calibration_outputs(out_dir / CALIBRATION_FILE, probs, raw, labels)
        files.append(CALIBRATION_FILE)
        transductive = {"selection_rate": rate, "selection_rate_fit_split": "val_select",
                        "selection_rate_candidates": rows, "min_test": MIN_TEST_BATCH,
                        "calibration_file": CALIBRATION_FILE}
    answers = q.argmax(1)
    special = {}
    for name, score in (("gate", g), ("softmax", q.max(1))):
        cert = certify_score_threshold(score, answers, labels, target, delta)
        exits = score >= cert.exit_threshold if cert.exit_threshold is not None else np.zeros(len(labels), bool)
        special[name] = _special_case(cert, exits, labels, cfg.deploy_prior)
    metrics = {**calib_metrics(q, labels), "accuracy_uncalibrated": float((probs.argmax(1) == labels).mean())}
    doc = scrcparams_document(
        result, calibrator, gate_spec, read_training(ctx.layout, ctx.partition)["checkpoint_id"], cfg.deploy_prior,
        float(coverage_at_prior(result.calib_exits, labels, cfg.deploy_prior)), metrics=metrics,
        calibrator_fit_split="val_select", special_cases=special, transductive=transductive,
    )
    figure = plot_scrc_frontier(doc, out_dir / "scrc_frontier.png")
    metadata = {
        "certified": bool(result.certified), "scrc_variant": result.variant, "lambda1": result.lambda1,
        "lambda2": result.lambda2, "coverage": float(result.coverage), "fnr_bound": float(result.fnr_bound),
        "n_exited_positives": int(result.n_exited_positives), "method": result.method, "reason": result.reason,
        "coverage_at_deploy_prior": doc["coverage_at_deploy_prior"], "calibrator": calibrator["method"],
        "gate_calibrator": gate_spec["method"], "calibrator_fit_split": "val_select",
        "gate_coverage": special["gate"]["coverage"], "softmax_coverage": special["softmax"]["coverage"],
    }
    if transductive is not None:
        metadata["selection_rate"] = transductive["selection_rate"]
    else:
        metadata["order"] = result.method_params["order"]
    choice = (transductive["selection_rate_candidates"] if transductive is not None
              else result.method_params["order_choice"]["families"])
    table = "selection rates (val_select)" if transductive is not None else "candidate families (val_select)"
    special_rows = [{"policy": name, **{k: v for k, v in case.items() if k != "reason"}} for name, case in special.items()]
    return FittedPolicy(doc, metadata, {"SCRC certified frontier (val_calib)": figure},
                        {table: choice, "special cases (val_calib)": special_rows}, files=files)
