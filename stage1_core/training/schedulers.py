"""The baseline's learning-rate schedule: linear warm-up, then half a cosine, per optimiser step.

``lr(step) = base_lr * f(step)`` with ``f(step) = step / warmup`` while ``step < warmup`` and
``0.5 * (1 + cos(pi * progress))`` after, ``progress = (step - warmup) / (total - warmup)``.
Two baseline bugs are fixed: steps are counted in optimiser steps (the baseline counted batches
and so, with gradient accumulation, stopped halfway down the cosine), and ``warmup == total``
no longer divides by zero (progress is clamped to [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def optimizer_steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    """Optimiser steps in an epoch of ``num_batches`` (a last partial accumulation group steps too)."""
    if num_batches < 1:
        raise ValueError(f"an epoch needs at least one batch, got {num_batches}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
    return math.ceil(num_batches / grad_accum_steps)


def warmup_cosine_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier ``f(step)`` described in the module docstring."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_lambda


def build_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """``LambdaLR`` with :func:`warmup_cosine_lambda`; call ``step()`` after every optimiser step."""
    return LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps, total_steps))
