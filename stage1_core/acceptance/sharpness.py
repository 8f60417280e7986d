"""Phase 5: SAM / F-SAM training is stable and improves over the AdamW reference.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.gates import COVERAGE_TOLERANCE, GateVerdict
from stage1_core.store import read_training

from .readers import certified_coverage, evaluation_record, training_record
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("training_stable", "checkpoint",
        "no training-loss spike above loss_spike_factor times the running median and no non-finite "
        "gradient norm (gradient-norm trace in the metadata)")

declare("improves_over_adamw", "evaluation",
        "the SAM/F-SAM run's val_select selection metric is better than the AdamW reference phase's, and "
        "its certified coverage on val_calib is not lower by more than 2 points")


# ----- rules (pure) ---------------------------------------------------------------------


def loss_spikes(step_losses: Sequence[float], factor: float, window: int = 20, warmup: int = 10) -> list[int]:
    """1-based steps whose loss exceeds the running median by more than ``factor - 1`` running scales.

    Running median and scale are taken over the previous ``window`` steps; the scale is the median
    of ``|loss|``. For a positive loss this is exactly "loss > factor x running median"; the
    gated heads' loss has a coverage reward and can be negative, which a plain ratio cannot judge.
    The first ``warmup`` steps only seed the median (early losses fall fast and are noisy); a run
    shorter than ``3 x warmup`` steps is seeded with its first third (at least one step), so a short
    fine-tuning run is judged too rather than passing unexamined.
    """
    losses = [float(v) for v in step_losses]
    seed = min(warmup, max(1, len(losses) // 3))
    spikes = []
    for i in range(seed, len(losses)):
        previous = losses[max(0, i - window):i]
        median, scale = float(np.median(previous)), float(np.median(np.abs(previous)))
        if scale > 0 and losses[i] > median + (factor - 1.0) * scale:
            spikes.append(i + 1)
    return spikes


def check_training_stable(step_losses: Sequence[float], grad_norms: Sequence[float], factor: float) -> GateVerdict:
    """No loss spike above ``factor`` x the running median and no non-finite loss or gradient norm."""
    problems = []
    bad_norms = [i + 1 for i, v in enumerate(grad_norms) if not math.isfinite(float(v))]
    bad_losses = [i + 1 for i, v in enumerate(step_losses) if not math.isfinite(float(v))]
    if not step_losses:
        problems.append("no optimiser step was recorded")
    if bad_norms:
        problems.append(f"non-finite gradient norm at step(s) {bad_norms[:10]}")
    if bad_losses:
        problems.append(f"non-finite training loss at step(s) {bad_losses[:10]}")
    finite = [v if math.isfinite(float(v)) else 0.0 for v in step_losses]
    spikes = loss_spikes(finite, factor)
    if spikes:
        problems.append(f"{len(spikes)} loss spike(s) above {factor:g}x the running median, at step(s) {spikes[:10]}")
    finite_norms = [float(v) for v in grad_norms if math.isfinite(float(v))]
    message = "; ".join(problems) or (
        f"{len(step_losses)} steps, no loss spike above {factor:g}x the running median, gradient norms finite "
        f"(max {max(finite_norms):.3g}, median {float(np.median(finite_norms)):.3g})")
    return GateVerdict("training_stable", not problems, message,
                       {"steps": len(step_losses), "spikes": len(spikes), "spike_factor": factor,
                        "non_finite_grad_norms": len(bad_norms),
                        "max_grad_norm": max(finite_norms) if finite_norms else None,
                        "median_grad_norm": float(np.median(finite_norms)) if finite_norms else None})


def check_improves_over_adamw(current: Mapping[str, Any], reference: Mapping[str, Any], metric: str, mode: str,
                              coverage_tolerance: float = COVERAGE_TOLERANCE) -> GateVerdict:
    """The SAM/F-SAM run's selection metric beats the AdamW reference's; certified coverage within 2 points.

    ``mode`` is ``"min"`` (AUGRC: lower is better) or ``"max"`` (accuracy).
    """
    value, ref_value = float(current["selection_value"]), float(reference["selection_value"])
    better = value < ref_value if mode == "min" else value > ref_value
    cov_drop = float(reference["coverage"]) - float(current["coverage"])
    problems = []
    if not better:
        problems.append(f"val_select {metric} {value:.5f} is not better than {reference['phase']}'s {ref_value:.5f} "
                        f"({'lower' if mode == 'min' else 'higher'} is better)")
    if cov_drop > coverage_tolerance + 1e-12:
        problems.append(f"certified coverage {current['coverage']:.4f} is {cov_drop:.4f} below {reference['phase']}'s "
                        f"{reference['coverage']:.4f}")
    message = "; ".join(problems) or (
        f"val_select {metric} {value:.5f} vs {reference['phase']} (AdamW) {ref_value:.5f}; certified coverage "
        f"{current['coverage']:.4f} vs {reference['coverage']:.4f}")
    return GateVerdict("improves_over_adamw", not problems, message,
                       {"metric": metric, "value": value, "reference_value": ref_value, "reference_phase": reference["phase"],
                        "coverage": float(current["coverage"]), "reference_coverage": float(reference["coverage"]),
                        "optimizer": current.get("optimizer"), "reference_optimizer": reference.get("optimizer")})


# ----- readers ---------------------------------------------------------------------------


@reader("training_stable")
def _training_stable(ctx: StepContext) -> GateVerdict:
    training = training_record(ctx)
    return check_training_stable(training.get("step_losses", []), training.get("grad_norms", []),
                                       float(training["loss_spike_factor"]))


@reader("improves_over_adamw")
def _improves_over_adamw(ctx: StepContext) -> GateVerdict:
    from stage1_core.training.trainer import SELECTION_METRICS

    evaluation_record(ctx)
    training = training_record(ctx)
    previous = ctx.reference_phase()
    if previous is None:
        return GateVerdict("improves_over_adamw", False, f"no AdamW reference phase of {ctx.partition} was evaluated", {})
    before = read_training(ctx.layout, previous)
    if before.get("optimizer", "adamw") != "adamw" or before["selection_metric"] != training["selection_metric"]:
        return GateVerdict("improves_over_adamw", False,
                           f"{previous} is not an AdamW run with the same selection metric, so it is no reference", {})
    metric = training["selection_metric"]
    current = {"selection_value": training["best_metric"], "coverage": certified_coverage(ctx, ctx.partition),
               "optimizer": training.get("optimizer")}
    reference = {"selection_value": before["best_metric"], "coverage": certified_coverage(ctx, previous),
                 "phase": previous, "optimizer": before.get("optimizer", "adamw")}
    return check_improves_over_adamw(current, reference, metric, SELECTION_METRICS[metric])
