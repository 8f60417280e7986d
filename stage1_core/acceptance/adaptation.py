"""Phase 4: ExPLoRA pre-training, PEFT adapters, performance kept, memory within budget.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.store import read_backbone, read_training

from stage1_core.gates import GateVerdict

from .compare import paired_compare, paired_verdict
from .readers import bootstrap_settings, evaluation_record, paired_val_test, training_record
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("explora_pretraining_completed", "backbone",
        "ExPLoRA pre-training ran with finite losses and lowered the masked-reconstruction loss on held-"
        "out train images by at least explora_min_gain (relative), with a decoder-only control reported")

declare("peft_applied_correctly", "checkpoint",
        "the expected backbone modules carry adapters, the adapted model at initialisation equals the "
        "base, merged equals unmerged, only adapter and head parameters train (trainable fraction "
        "reported)")

declare("performance_maintained", "evaluation",
        "not worse than the previous phase, paired per image on val_test: accuracy (CI lower end of the "
        "difference >= -accuracy_margin) and the deployed policy's coverage (>= -coverage_margin); the "
        "verdict states n, the disagreement share and each margin's power for equal models")

declare("no_memory_issues", "checkpoint",
        "training needed no out-of-memory batch-size fallback and its peak memory stayed within "
        "memory_budget_gb (the reference phase's peak reported beside it)")


# ----- rules (pure) ---------------------------------------------------------------------


def check_explora_pretraining(losses_finite: bool, gain: Mapping[str, Any]) -> GateVerdict:
    """ExPLoRA ran with finite losses and cut the held-out masked-reconstruction loss by >= the margin.

    ``gain`` is :func:`stage1_core.domain_adaptation.explora.reconstruction_gain` with a
    decoder-only control: the reduction from the start must reach ``margin`` and the adapted
    backbone must end below the control (a decoder trained from scratch lowers the loss by itself).
    """
    problems = []
    if not losses_finite:
        problems.append("a pre-training loss was not finite")
    start, end, relative = gain.get("start"), gain.get("end"), gain.get("relative_reduction")
    margin = float(gain.get("margin", 0.0))
    if relative is None:
        problems.append("the held-out loss was not measured at both start and end")
    elif relative < margin:
        problems.append(f"held-out reconstruction loss fell {100 * relative:.1f}% ({start:.4f} -> {end:.4f}), "
                        f"less than the required {100 * margin:.1f}%")
    over_control = gain.get("relative_to_control")
    if over_control is not None and over_control <= 0:
        problems.append(f"the adapted backbone ends at {end:.4f}, not below the decoder-only control's "
                        f"{gain.get('control_end'):.4f}: the gain is the decoder's, not the backbone's")
    message = "; ".join(problems) or (
        f"held-out reconstruction loss {start:.4f} -> {end:.4f} (-{100 * relative:.1f}%, needs "
        f">= {100 * margin:.1f}%); decoder-only control ends at {gain.get('control_end'):.4f} "
        f"({100 * over_control:+.1f}% for the adapted backbone)"
    )
    return GateVerdict("explora_pretraining_completed", not problems, message,
                       {"losses_finite": bool(losses_finite), **{k: v for k, v in gain.items() if k != "passed"}})


def check_peft_applied(init: Mapping[str, Any], final: Mapping[str, Any]) -> GateVerdict:
    """Adapters sit exactly on the expected modules, start as the identity, merge exactly, and only they train.

    ``init`` is :func:`stage1_core.model.peft.verify_peft` right after the adapters were applied,
    ``final`` the same after training (its ``init_max_abs_diff`` then measures how far training
    moved the output, so only the merged and adapters-off differences are judged there).
    """
    problems = []
    if init.get("missing_modules") or init.get("unexpected_modules") or not init.get("adapted_modules"):
        problems.append(f"adapters on the wrong modules: missing {init.get('missing_modules')}, unexpected "
                        f"{init.get('unexpected_modules')}")
    atol = float(init.get("atol", 1e-4))
    for label, value in (("output at initialisation vs base", init.get("init_max_abs_diff")),
                         ("merged vs unmerged at initialisation", init.get("merged_max_abs_diff")),
                         ("merged vs unmerged after training", final.get("merged_max_abs_diff")),
                         ("adapters switched off vs base after training", final.get("disabled_max_abs_diff"))):
        if value is None or not math.isfinite(float(value)) or float(value) > atol:
            problems.append(f"{label}: max |diff| {value} > {atol}")
    if init.get("non_adapter_trainable"):
        problems.append(f"non-adapter backbone parameters train: {list(init['non_adapter_trainable'])[:5]}")
    message = "; ".join(problems) or (
        f"{init.get('kind')} on {len(init['adapted_modules'])} modules as expected; init diff "
        f"{init['init_max_abs_diff']:.2e}, merged diff {final['merged_max_abs_diff']:.2e} (atol {atol:g}); "
        f"trainable {init['trainable']} of {init['total']} backbone parameters ({100 * init['trainable_fraction']:.2f}%)"
    )
    figures = {"kind": init.get("kind"), "adapted_modules": len(init.get("adapted_modules") or []),
               "init_max_abs_diff": init.get("init_max_abs_diff"), "merged_max_abs_diff": final.get("merged_max_abs_diff"),
               "disabled_max_abs_diff": final.get("disabled_max_abs_diff"), "trainable": init.get("trainable"),
               "total": init.get("total"), "trainable_fraction": init.get("trainable_fraction"), "atol": atol}
    return GateVerdict("peft_applied_correctly", not problems, message, figures)


def check_performance_maintained(current: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray],
                                 previous_phase: str, accuracy_margin: float, coverage_margin: float,
                                 bootstrap: Mapping[str, Any]) -> GateVerdict:
    """Non-inferiority of accuracy and coverage vs the previous phase on the same val_test images."""
    accuracy = paired_compare(current["correct"], previous["correct"], margin=accuracy_margin,
                              direction="non-inferiority", **bootstrap)
    coverage = paired_compare(current["exit"], previous["exit"], margin=coverage_margin,
                              direction="non-inferiority", **bootstrap)
    return paired_verdict("performance_maintained",
                          [("accuracy", f"val_test accuracy vs {previous_phase}", *accuracy),
                           ("coverage", f"val_test coverage vs {previous_phase}", *coverage)],
                          figures={"previous_phase": previous_phase})


def check_no_memory_issues(oom_fallback: bool | None, peak_gb: float | None, budget_gb: float,
                           reference: Mapping[str, Any] | None = None) -> GateVerdict:
    """No out-of-memory batch-size fallback and peak memory within the budget (reference phase beside it)."""
    problems = []
    if oom_fallback:
        problems.append("the out-of-memory fallback batch size was needed")
    if peak_gb is None or not math.isfinite(float(peak_gb)):
        problems.append("peak memory was not measured")
    elif peak_gb > budget_gb:
        problems.append(f"peak memory {peak_gb:.2f} GiB exceeds memory_budget_gb {budget_gb:.2f}")
    ref = dict(reference or {})
    beside = f"; {ref['phase']} peaked at {ref['peak_gb']:.2f} GiB" if ref.get("peak_gb") is not None else ""
    message = "; ".join(problems) or f"peak {peak_gb:.2f} GiB <= budget {budget_gb:.2f} GiB, no OOM fallback{beside}"
    return GateVerdict("no_memory_issues", not problems, message,
                       {"oom_fallback": bool(oom_fallback), "peak_gb": peak_gb, "budget_gb": budget_gb,
                        "reference_phase": ref.get("phase"), "reference_peak_gb": ref.get("peak_gb")})


# ----- readers ---------------------------------------------------------------------------


@reader("explora_pretraining_completed")
def _explora_pretraining(ctx: StepContext) -> GateVerdict:
    ctx.require("backbone-check", [("backbone", ctx.partition)])
    explora = read_backbone(ctx.layout, ctx.partition).get("explora")
    if explora is None:
        return GateVerdict("explora_pretraining_completed", False,
                           f"backbone[{ctx.partition}] was not adapted with ExPLoRA (no record of it)", {})
    return check_explora_pretraining(bool(explora["losses_finite"]), explora["gain"])


@reader("peft_applied_correctly")
def _peft_applied(ctx: StepContext) -> GateVerdict:
    peft = training_record(ctx).get("peft")
    if peft is None:
        return GateVerdict("peft_applied_correctly", False,
                           f"checkpoint[{ctx.partition}] did not fine-tune backbone adapters (no PEFT record)", {})
    return check_peft_applied(peft["init"], peft["final"])


@reader("performance_maintained")
def _performance_maintained(ctx: StepContext) -> GateVerdict:
    evaluation_record(ctx)
    previous = ctx.reference_phase()
    if previous is None:
        return GateVerdict("performance_maintained", False, f"no earlier phase of {ctx.partition} to compare with", {})
    current, before = paired_val_test(ctx, previous)
    return check_performance_maintained(current, before, previous, float(ctx.cfg.accuracy_margin),
                                        float(ctx.cfg.coverage_margin), bootstrap_settings(ctx))


@reader("no_memory_issues")
def _no_memory_issues(ctx: StepContext) -> GateVerdict:
    training = training_record(ctx)
    memory = training.get("memory") or {}
    peak = memory.get("peak_cuda_gb") if memory.get("peak_cuda_gb") is not None else memory.get("peak_rss_gb")
    reference = None
    previous = ctx.reference_phase("checkpoint")
    if previous is not None:
        ref_memory = read_training(ctx.layout, previous).get("memory") or {}
        ref_peak = ref_memory.get("peak_cuda_gb") if ref_memory.get("peak_cuda_gb") is not None else ref_memory.get("peak_rss_gb")
        reference = {"phase": previous, "peak_gb": ref_peak}
    return check_no_memory_issues(training.get("oom_fallback"), peak, float(memory.get("budget_gb", math.inf)),
                                        reference)
