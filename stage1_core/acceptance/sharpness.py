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

from stage1_core.gates import GateVerdict
from stage1_core.store import read_training

from .compare import SLACK, paired_compare, paired_verdict

from .readers import bootstrap_settings, evaluation_record, paired_val_test, training_record
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("training_stable", "checkpoint",
        "no training-loss spike above loss_spike_factor times the running median and no non-finite "
        "gradient norm (gradient-norm trace in the metadata)")

declare("improves_over_adamw", "evaluation",
        "superiority on val_test, paired per image: the SAM/F-SAM run's AUGRC (max-softmax confidence) is "
        "lower than the AdamW reference phase's, the paired bootstrap CI's lower end of the gain (AUGRC "
        "AdamW - AUGRC F-SAM) above fsam_min_gain (two equal models pass with probability <= 2.5%), and its "
        "coverage not worse (CI lower end of the difference >= -coverage_margin)")


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


def check_improves_over_adamw(augrc_gain: Mapping[str, float], current_exit: np.ndarray, reference_exit: np.ndarray,
                              reference_phase: str, min_gain: float, coverage_margin: float,
                              bootstrap: Mapping[str, Any]) -> GateVerdict:
    """Superiority of the val_test AUGRC (CI lower end of the gain > ``min_gain``) and non-inferior coverage.

    ``augrc_gain`` is :func:`~stage1_core.metrics.paired.paired_bootstrap_augrc_gain` with the AdamW
    run as ``b``; the exits are the two fixed policies' per-image decisions on the same images.
    """
    problems = []
    lower, upper = float(augrc_gain["ci_lower"]), float(augrc_gain["ci_upper"])
    better = lower > min_gain + SLACK
    line = (f"val_test AUGRC {augrc_gain['augrc_a']:.5f} vs {reference_phase} (AdamW) {augrc_gain['augrc_b']:.5f}: "
            f"gain {augrc_gain['gain']:+.5f}, paired bootstrap CI [{lower:+.5f}, {upper:+.5f}]; superiority needs "
            f"the CI's lower end > {min_gain:+.5f}: {'passes' if better else 'FAILS'}")
    if not better:
        problems.append(line)
    coverage = paired_compare(current_exit, reference_exit, margin=coverage_margin, direction="non-inferiority",
                              **bootstrap)
    verdict = paired_verdict("improves_over_adamw", [("coverage", f"val_test coverage vs {reference_phase}", *coverage)],
                             problems, {"augrc": augrc_gain["augrc_a"], "reference_augrc": augrc_gain["augrc_b"],
                                        "augrc_gain": augrc_gain["gain"], "augrc_gain_ci_lower": lower,
                                        "augrc_gain_ci_upper": upper, "min_gain": min_gain,
                                        "reference_phase": reference_phase})
    if verdict.passed:
        return GateVerdict(verdict.criterion, True, f"{line}; {verdict.message}", verdict.figures)
    return verdict


# ----- readers ---------------------------------------------------------------------------


@reader("training_stable")
def _training_stable(ctx: StepContext) -> GateVerdict:
    training = training_record(ctx)
    return check_training_stable(training.get("step_losses", []), training.get("grad_norms", []),
                                       float(training["loss_spike_factor"]))


@reader("improves_over_adamw")
def _improves_over_adamw(ctx: StepContext) -> GateVerdict:
    from stage1_core.metrics.paired import paired_bootstrap_augrc_gain
    from stage1_core.steps.training import load_prediction_outputs

    evaluation_record(ctx)
    training_record(ctx)
    previous = ctx.reference_phase()
    if previous is None:
        return GateVerdict("improves_over_adamw", False, f"no AdamW reference phase of {ctx.partition} was evaluated", {})
    if read_training(ctx.layout, previous).get("optimizer", "adamw") != "adamw":
        return GateVerdict("improves_over_adamw", False, f"{previous} is not an AdamW run, so it is no reference", {})
    current, before = paired_val_test(ctx, previous)
    probs_a, _, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_test")
    probs_b, _, _ = load_prediction_outputs(ctx.layout, previous, "val_test")
    bootstrap = bootstrap_settings(ctx)
    gain = paired_bootstrap_augrc_gain(probs_a.max(1), (probs_a.argmax(1) != labels).astype(float),
                                       probs_b.max(1), (probs_b.argmax(1) != labels).astype(float), **bootstrap)
    return check_improves_over_adamw(gain, current["exit"], before["exit"], previous, float(ctx.cfg.fsam_min_gain),
                                     float(ctx.cfg.coverage_margin), bootstrap)
