"""What criteria read: the phase's training record, evaluation, policy certificate, reference phase.

Shared by the criterion families; each reader checks the lineage of what it reads first
(``ctx.require``), so a verdict never judges a stale artifact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.artifacts import read_json
from stage1_core.store import EVALUATION_FILE, policy_path, read_policy_document, read_training

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


def training_record(ctx: StepContext) -> dict[str, Any]:
    ctx.require("checkpoint-check", [("checkpoint", ctx.partition)])
    return read_training(ctx.layout, ctx.partition)


def evaluation_record(ctx: StepContext) -> dict[str, Any]:
    ctx.require("evaluation-check", [("evaluation", ctx.partition)])
    return read_json(ctx.layout.path("evaluation", ctx.partition) / EVALUATION_FILE, schema="evaluation")


def certified_coverage(ctx: StepContext, partition: str) -> float:
    policy = read_json(ctx.layout.path("evaluation", partition) / EVALUATION_FILE, schema="evaluation")["policy"]
    return float(read_policy_document(ctx.layout, partition, policy)["coverage"])


def scrc_policy(ctx: StepContext):
    """``(scrcparams document, SCRCExitPolicy)`` of the phase; ValueError when its policy is not SCRC."""
    from stage1_core.policies import load_policy

    if ctx.cfg.exit_policy != "scrc":
        raise ValueError(f"{ctx.partition} deploys the {ctx.cfg.exit_policy!r} policy, not SCRC")
    return (read_policy_document(ctx.layout, ctx.partition, "scrc"),
            load_policy("scrc", policy_path(ctx.layout, ctx.partition, "scrc")))


def scrc_comparison(ctx: StepContext) -> dict[str, Any]:
    comparison = evaluation_record(ctx).get("scrc_comparison")
    if comparison is None:
        raise ValueError(f"evaluation[{ctx.partition}] holds no SCRC comparison (is its policy SCRC?)")
    return comparison


def deployed_probabilities(ctx: StepContext, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, labels)`` the deployed policy answers from on ``split`` (the policy's
    ``reported_probs``: SCRC's calibrated q, the softmax for the others)."""
    from stage1_core.policies import load_policy, policy_class  # scipy
    from stage1_core.steps.training import load_prediction_outputs  # torch

    probs, raw, labels = load_prediction_outputs(ctx.layout, ctx.partition, split)
    name = ctx.cfg.exit_policy
    decisions = load_policy(name, policy_path(ctx.layout, ctx.partition, name)).decide(probs, gate_scores=raw)
    return policy_class(name).reported_probs(decisions, probs), labels
