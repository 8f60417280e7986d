"""EMA: the baseline's update with warm-up off, warm-up schedule, apply/restore, horizon warning."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from stage1_core.training.ema import EMA, check_ema_horizon, initial_weight_share


class BaselineEMA:
    """The old script's EMA, verbatim in behaviour."""

    def __init__(self, model, decay):
        self.model, self.decay, self.shadow = model, decay, {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.shadow[name] = param.data.clone()

    def update(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                new_average = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new_average.clone()


def _perturb(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step + i).view_as(p))


def test_update_with_warmup_off_equals_the_baseline_formula_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    model[0].bias.requires_grad_(False)
    ours, theirs = EMA(model, decay=0.9, warmup=False), BaselineEMA(model, 0.9)
    assert set(ours.shadow) == set(theirs.shadow) and "0.bias" not in ours.shadow
    for step in range(5):
        _perturb(model, step)
        ours.update()
        theirs.update()
    for name in theirs.shadow:
        assert torch.equal(ours.shadow[name], theirs.shadow[name])
    assert ours.num_updates == 5


def test_warmup_decay_schedule():
    ema = EMA(nn.Linear(2, 2), decay=0.9999, warmup=True)
    decays = []
    for _ in range(4):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13])
    capped = EMA(nn.Linear(2, 2), decay=0.5, warmup=True)
    capped.num_updates = 100
    assert capped.current_decay() == 0.5


def test_apply_shadow_and_restore():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb(model, 1)
    ema.update()
    after = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        for name, value in model.state_dict().items():
            assert torch.equal(value, ema.shadow[name])
            assert torch.allclose(value, 0.5 * after[name] + 0.5 * live[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value, after[name])


def test_horizon_warning(caplog):
    assert check_ema_horizon(0.9, total_steps=100, warmup=False) is None
    with pytest.warns(UserWarning, match=r"EMA horizon .* = 10000 .* exceeds the 1000 steps .* keep 90\.5%"):
        check_ema_horizon(0.9999, total_steps=1000, warmup=False)
    with caplog.at_level(logging.INFO, logger="stage1_core.training.ema"), warnings.catch_warnings():
        warnings.simplefilter("error")
        message = check_ema_horizon(0.9999, total_steps=1000, warmup=True)
    assert message is not None and "keep 0.0%" in caplog.text
    assert initial_weight_share(0.9999, 1000, warmup=False) == pytest.approx(0.9999**1000)


def test_load_shadow_checks_names_and_shapes():
    ema = EMA(nn.Linear(3, 2), decay=0.9)
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        ema.load_shadow({"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="shape mismatches"):
        ema.load_shadow({"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    ema.load_shadow({"weight": torch.ones(2, 3), "bias": torch.ones(2)}, num_updates=7)
    assert ema.num_updates == 7 and torch.equal(ema.shadow["weight"], torch.ones(2, 3))
