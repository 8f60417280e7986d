"""Robustness step part: val_test per challenge level, the mixture and the clean images side by side.

Called by the evaluation step when the phase runs the deployment pipeline. Each row decides with
the deployed predictor (head, policy, served-probability calibrator) on one view of val_test
(:mod:`stage1_core.steps.deployment`) and is summarised by
:func:`stage1_core.metrics.robustness.robustness_table`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stage1_core.artifacts import write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.challenge import LEVELS
from stage1_core.steps.context import Layout

ROBUSTNESS_FILE = "robustness.json"
#: Row name -> view of val_test.
ROWS = (("mixture", "deploy"), *((f"level{level}", f"level{level}") for level in LEVELS), ("clean", "clean"))


@dataclass
class RobustnessReport:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    metadata: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def view_decisions(predictor: Any, features: Any) -> tuple[np.ndarray, Any]:
    """``(softmax probs, served decisions)`` of the deployed predictor on one view's features."""
    logits, gates = predictor.head_outputs_from_features(features)
    probs = predictor.probabilities(logits)
    return probs, predictor.serve(predictor.policy.decide(probs, gate_scores=gates), probs)


def robustness_report(cfg: Stage1ProConfig, layout: Layout, partition: str, predictor: Any, target: float,
                      delta: float, out_dir: Path) -> RobustnessReport | None:
    """The per-level report of ``partition`` (None without the deployment pipeline)."""
    from stage1_core.data.splits import require_role
    from stage1_core.metrics.robustness import robustness_table
    from stage1_core.reporting.robustness_figures import plot_robustness
    from stage1_core.steps.backbone import model_features
    from stage1_core.steps.data import read_splits
    from stage1_core.steps.deployment import deployment_section

    section = deployment_section(layout, partition)
    if section is None:
        return None
    splits, _ = read_splits(layout)
    views = {}
    for name, view in ROWS:
        data = model_features(layout, partition, "val_test", view)
        require_role(data.sample_ids, "evaluate", splits, f"{partition}'s {name} rows")
        _, decisions = view_decisions(predictor, data.features)
        views[name] = {"labels": data.labels.numpy().astype(int), "exit": np.asarray(decisions.exit, dtype=bool),
                       "exit_label": np.asarray(decisions.label, dtype=int),
                       "p_roadwork": np.asarray(decisions.p_roadwork, dtype=np.float64)}
    rows = robustness_table(views, target, delta, cfg.val_test_alpha, cfg.deploy_prior, seed=cfg.seed)
    by_name = {row["view"]: row for row in rows}
    flagged = [row["view"] for row in rows if row["significantly_above_target"]]
    summary = {"pipeline": section["pipeline"], "seed": section["seed"], "train_views": section["train_views"],
               "rows": rows, "levels_significantly_above_target": flagged}
    write_json(out_dir / ROBUSTNESS_FILE, summary)
    figure = plot_robustness(rows, target, out_dir / "robustness.png")
    metadata: dict[str, Any] = {"deploy_pipeline": section["pipeline"],
                                "levels_significantly_above_target": ", ".join(flagged) or "none"}
    for name in ("mixture", "clean"):
        row = by_name[name]
        metadata.update({f"{name}_coverage": row["coverage"], f"{name}_fnr_on_exits": row["fnr_on_exits"],
                         f"{name}_accuracy_round_p": row["accuracy_round_p"], f"{name}_reward": row["reward"]})
    return RobustnessReport(rows, summary, metadata, {"robustness per challenge level (val_test)": figure},
                            [ROBUSTNESS_FILE])
