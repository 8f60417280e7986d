"""Evaluation step: the deployable predictor's decisions on val_test only, with intervals.

The promise evaluated (target FNR and delta) is read from the policy's certificate, never from
the live config; a config that asks for another promise makes the policy stale instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from stage1_core.artifacts import jsonable, save_tensors, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.splits import require_role
from stage1_core.policies import policy_class
from stage1_core.steps.backbone import model_features
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.data import read_splits
from stage1_core.steps.policy import build_predictor
from stage1_core.store import DECISIONS_FILE, EVALUATION_FILE, METRICS_FILE, read_policy_document, read_training

#: The checkpoint's training log completed with the certified policy's val_test figures (plan 7.3).
TRAINING_LOG_FILE = "training_log.csv"


def evaluate_phase(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Evaluate the deployed decisions on val_test only, with bootstrap and Clopper-Pearson intervals."""
    from stage1_core.evaluation import evaluate_decisions
    from stage1_core.acceptance.standing import val_test_fnr_figures
    from stage1_core.reporting.figures import plot_reliability, plot_risk_coverage

    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("evaluation", [("exit_policy", partition), ("predictions", partition),
                                        ("checkpoint", partition), ("cached_features", partition)])
    cfg = ctx.cfg
    data = model_features(layout, partition, "val_test")
    require_role(data.sample_ids, "evaluate", read_splits(layout)[0], f"{partition}'s evaluation rows")
    predictor = build_predictor(config, layout, partition)
    certificate = read_policy_document(layout, partition, cfg.exit_policy)
    target, delta = float(certificate["target_fnr"]), float(certificate["delta"])
    logits, raw_gate = predictor.head_outputs_from_features(data.features)
    probs = predictor.probabilities(logits)
    decisions = predictor.serve(predictor.policy.decide(probs, gate_scores=raw_gate), probs)
    policy = policy_class(cfg.exit_policy)
    probs = policy.reported_probs(decisions, probs)
    labels = data.labels.numpy().astype(int)
    report = evaluate_decisions(
        probs, labels, decisions, deploy_prior=cfg.deploy_prior, n_bootstrap=cfg.bootstrap_samples,
        confidence=cfg.bootstrap_confidence, seed=cfg.seed, target_fnr=target, delta=delta,
    )
    out_dir = layout.dir("evaluation", partition)
    report.to_csv(out_dir / METRICS_FILE)
    save_tensors(out_dir / DECISIONS_FILE, {
        "exit": torch.as_tensor(np.asarray(decisions.exit, dtype=bool)),
        "label": torch.as_tensor(np.asarray(decisions.label, dtype=np.int64)),
        "p_roadwork": torch.as_tensor(np.asarray(decisions.p_roadwork, dtype=np.float64)),
    })
    exited = np.asarray(decisions.exit, dtype=bool)
    positives = exited & (labels == 1)
    n_pos = int(positives.sum())
    n_fn = int((positives & (np.asarray(decisions.label) == 0)).sum())
    summary = {
        "phase": partition,
        "policy": cfg.exit_policy,
        "checkpoint_id": read_training(layout, partition)["checkpoint_id"],
        "n_test": int(len(labels)),
        "n_exited_positives": n_pos,
        "n_false_negatives": n_fn,
        **jsonable(report.headline),
        "val_test_check": cfg.val_test_check,
        "val_test_alpha": cfg.val_test_alpha,
        "val_test_fnr_check": val_test_fnr_figures(n_pos, n_fn, target, delta, cfg.val_test_alpha),
    }
    extras, extra_figures = policy.evaluation_extras(certificate, probs, raw_gate, decisions, labels, cfg, out_dir)
    summary.update(extras)
    # Deployment pipeline: clean row and per-level robustness report (stage1_core.steps.robustness).
    from stage1_core.steps.robustness import robustness_report

    robustness = robustness_report(cfg, layout, partition, predictor, target, delta, out_dir)
    if robustness is not None:
        summary["deployment"] = robustness.summary
        summary.update(robustness.metadata)  # scalar mixture / clean figures: the bundle headline and summary
        extra_figures.update(robustness.figures)
    path = write_json(out_dir / EVALUATION_FILE, summary, schema="evaluation")
    confidence = probs.max(1)
    residuals = (probs.argmax(1) != labels).astype(float)
    figures = {
        "risk-coverage (val_test)": plot_risk_coverage(confidence, residuals, out_dir / "risk_coverage.png",
                                                       n_bootstrap=min(cfg.bootstrap_samples, 200), seed=cfg.seed),
        "reliability (val_test)": plot_reliability(probs, labels, out_dir / "reliability.png"),
    }
    figures["bootstrap distributions of FNR on exits and coverage (val_test)"] = _plot_exit_bootstrap(
        decisions, labels, cfg, target, out_dir / "exit_bootstrap.png")
    _complete_training_log(layout, partition, cfg.exit_policy, report, out_dir / TRAINING_LOG_FILE)
    sweep = layout.path("exit_policy", partition) / "threshold_sweep.png"
    if sweep.is_file():
        figures["threshold sweep (val_calib)"] = sweep
    figures.update(extra_figures)
    # training_log.csv holds wall-clock seconds: left out of the lineage id, like the figures.
    files = [METRICS_FILE, DECISIONS_FILE, EVALUATION_FILE] + (robustness.files if robustness is not None else [])
    record = ctx.finish("evaluation", files, inputs)
    rows = [jsonable(r) for r in report.table.to_dict(orient="records")]
    tables = {"metrics": rows, **({"robustness (val_test per challenge level)": robustness.rows} if robustness else {})}
    metadata = dict(summary, path=out_dir / METRICS_FILE, lineage_id=record.id)
    if robustness is not None:
        metadata.pop("deployment")
    return StepResult(path, metadata, tables=tables, figures=figures, record=record)


def _plot_exit_bootstrap(decisions: Any, labels: np.ndarray, cfg: Stage1ProConfig, target: float, path: Path) -> Path:
    """The bootstrap distributions behind the reported FNR and coverage intervals (same resamples)."""
    from stage1_core.metrics import bootstrap as bs
    from stage1_core.reporting.figures import plot_exit_bootstrap

    exits = np.asarray(decisions.exit, dtype=bool)
    statistic = bs.combine(bs.coverage_statistic(exits), bs.exit_statistic(exits, np.asarray(decisions.label), labels))
    point, distribution = bs.bootstrap_distribution(statistic, len(labels), n_resamples=cfg.bootstrap_samples,
                                                    seed=cfg.seed)
    return plot_exit_bootstrap(distribution, point, path, target_fnr=target, confidence=cfg.bootstrap_confidence)


def _complete_training_log(layout: Layout, partition: str, policy: str, report: Any, path: Path) -> Path:
    """The checkpoint's training log with the certified policy's val_test FNR and coverage on its last row."""
    from stage1_core.training.logging_csv import complete_log

    training = read_training(layout, partition)
    fnr, coverage = report.row("fnr_on_exited"), report.row("coverage")
    figures = {"fnr_on_exited": fnr["value"], "fnr_ci": (fnr["ci_lower"], fnr["ci_upper"]),
               "fnr_cp_upper": report.headline["fnr_on_exited_cp_upper"], "coverage": coverage["value"],
               "coverage_ci": (coverage["ci_lower"], coverage["ci_upper"])}
    return complete_log(layout.path("checkpoint", partition) / training["log_csv"], path, policy, figures)
