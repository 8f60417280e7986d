"""What criteria read: the phase's training record, evaluation, policy certificate, reference phase.

Shared by the criterion families; each reader checks the lineage of what it reads first
(``ctx.require``), so a verdict never judges a stale artifact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.artifacts import read_json
from stage1_core.store import DECISIONS_FILE, EVALUATION_FILE, policy_path, read_policy_document, read_training

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


def val_test_outcomes(ctx: StepContext, partition: str) -> dict[str, np.ndarray]:
    """A phase's fixed decisions on val_test, per image: ``labels``, ``exit``, ``correct`` (0/1 arrays)."""
    from stage1_core.artifacts import load_tensors
    from stage1_core.steps.training import load_prediction_outputs

    ctx.require("evaluation-check", [("evaluation", partition)])
    decisions = load_tensors(ctx.layout.path("evaluation", partition) / DECISIONS_FILE)
    labels = load_prediction_outputs(ctx.layout, partition, "val_test")[2]
    predicted = decisions["label"].numpy()
    return {"labels": np.asarray(labels), "exit": decisions["exit"].numpy().astype(float),
            "correct": (predicted == np.asarray(labels)).astype(float)}


def paired_val_test(ctx: StepContext, reference: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(current, reference)`` val_test outcomes of two phases, checked to be the same images in the same order."""
    current, before = val_test_outcomes(ctx, ctx.partition), val_test_outcomes(ctx, reference)
    if current["labels"].shape != before["labels"].shape or not np.array_equal(current["labels"], before["labels"]):
        raise ValueError(
            f"{ctx.partition} and {reference} were evaluated on different val_test images "
            f"({current['labels'].size} vs {before['labels'].size}, or other labels): re-materialise both evaluations "
            f"on the current splits"
        )
    return current, before


def bootstrap_settings(ctx: StepContext) -> dict[str, Any]:
    """The paired bootstrap's resamples, confidence and seed, from the config the evaluation recorded."""
    cfg = ctx.cfg
    return {"n_resamples": int(cfg.bootstrap_samples), "confidence": float(cfg.bootstrap_confidence),
            "seed": int(cfg.seed)}
