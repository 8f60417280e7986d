"""Evaluation step: the deployable predictor's decisions on val_test only, with intervals.

The promise evaluated (target FNR and delta) is read from the policy's certificate, never from
the live config; a config that asks for another promise makes the policy stale instead.
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import torch

from stage1_core.artifacts import save_tensors, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.splits import require_split
from stage1_core.steps.backbone import model_features
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.policy import build_predictor, read_policy_document
from stage1_core.steps.training import plain_row, read_training

EVALUATION_FILE = "evaluation.json"
METRICS_FILE = "metrics.csv"
DECISIONS_FILE = "decisions.pt"


def finite_or_none(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def evaluate_phase(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Evaluate the deployed decisions on val_test only, with bootstrap and Clopper-Pearson intervals."""
    from stage1_core.evaluation import evaluate_decisions
    from stage1_core.gates import val_test_fnr_figures
    from stage1_core.reporting.figures import plot_reliability, plot_risk_coverage

    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("evaluation", [("exit_policy", partition), ("predictions", partition),
                                        ("checkpoint", partition), ("cached_features", partition)])
    cfg = ctx.cfg
    require_split("val_test", "evaluate")
    data = model_features(layout, partition, "val_test")
    predictor = build_predictor(config, layout, partition)
    certificate = read_policy_document(layout, partition, cfg.exit_policy)
    target, delta = float(certificate["target_fnr"]), float(certificate["delta"])
    logits, raw_gate = predictor.head_outputs_from_features(data.features)
    probs = predictor.probabilities(logits)
    decisions = predictor.serve(predictor.policy.decide(probs, gate_scores=raw_gate), probs)
    if cfg.exit_policy == "scrc":
        probs = decisions.probs  # SCRC answers from its calibrated q: report what is deployed
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
        **{k: finite_or_none(v) for k, v in report.headline.items()},
        "val_test_check": cfg.val_test_check,
        "val_test_alpha": cfg.val_test_alpha,
        "val_test_fnr_check": val_test_fnr_figures(n_pos, n_fn, target, delta, cfg.val_test_alpha),
    }
    extra_figures = {}
    if cfg.exit_policy == "gate":
        from stage1_core.steps.gate_evaluation import gate_comparison

        summary["gate_comparison"], extra_figures = gate_comparison(
            certificate, probs, raw_gate, np.asarray(decisions.exit, dtype=bool), labels, cfg, out_dir)
    elif cfg.exit_policy == "scrc":
        from stage1_core.steps.scrc_evaluation import scrc_comparison

        summary["scrc_comparison"], extra_figures = scrc_comparison(certificate, decisions, labels, cfg, out_dir)
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
    sweep = layout.path("exit_policy", partition) / "threshold_sweep.png"
    if sweep.is_file():
        figures["threshold sweep (val_calib)"] = sweep
    figures.update(extra_figures)
    files = [METRICS_FILE, DECISIONS_FILE, EVALUATION_FILE] + (robustness.files if robustness is not None else [])
    record = ctx.finish("evaluation", files, inputs)
    rows = [plain_row(r) for r in report.table.to_dict(orient="records")]
    tables = {"metrics": rows, **({"robustness (val_test per challenge level)": robustness.rows} if robustness else {})}
    metadata = dict(summary, path=out_dir / METRICS_FILE, lineage_id=record.id)
    if robustness is not None:
        metadata.pop("deployment")
    return StepResult(path, metadata, tables=tables, figures=figures, record=record)


def read_metrics_csv(layout: Layout, partition: str) -> list[dict[str, Any]]:
    path = layout.path("evaluation", partition) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialise evaluation first")
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {"metric": row["metric"]}
            for key, value in row.items():
                if key != "metric":
                    parsed[key] = float(value) if value not in ("", None) else None
            rows.append(parsed)
    return rows
