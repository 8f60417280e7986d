"""The baseline's warm-up + cosine schedule, in optimiser steps."""

from __future__ import annotations

import math

import pytest
import torch

from stage1_core.training.schedulers import build_scheduler, optimizer_steps_per_epoch, warmup_cosine_lambda


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (1, 0.1), (5, 0.5), (10, 1.0), (32.5, 0.5 * (1 + math.cos(math.pi * 0.25))), (55, 0.5), (100, 0.0)],
)
def test_values_at_chosen_steps(step, expected):
    f = warmup_cosine_lambda(warmup_steps=10, total_steps=100)
    assert f(step) == pytest.approx(expected, abs=1e-12)


def test_warmup_equal_to_total_and_no_warmup_are_safe():
    f = warmup_cosine_lambda(warmup_steps=20, total_steps=20)
    assert [f(s) for s in (0, 10, 19)] == pytest.approx([0.0, 0.5, 0.95])
    assert f(20) == 1.0 and f(25) == 0.0  # progress clamped to [0, 1]: no division by zero
    g = warmup_cosine_lambda(warmup_steps=0, total_steps=4)
    assert [g(s) for s in range(5)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_lambda_lr_follows_the_multiplier_per_optimizer_step():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * warmup_cosine_lambda(2, 6)(s) for s in range(6)]
    assert lrs == pytest.approx(expected)


def test_steps_per_epoch_counts_a_partial_accumulation_group():
    assert optimizer_steps_per_epoch(10, 2) == 5
    assert optimizer_steps_per_epoch(11, 2) == 6
    assert optimizer_steps_per_epoch(3, 1) == 3
    with pytest.raises(ValueError):
        optimizer_steps_per_epoch(0, 2)
