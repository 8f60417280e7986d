"""AdamW settings and head / backbone parameter groups."""

from __future__ import annotations

import pytest
from torch import nn

from stage1_core.model.head import Stage1Head
from stage1_core.training.optimizers import build_adamw, param_groups


def test_adamw_uses_the_baseline_settings_and_one_group_for_a_frozen_backbone():
    head, backbone = Stage1Head(8), nn.Linear(4, 4)
    backbone.requires_grad_(False)
    opt = build_adamw(head, backbone, lr_head=1e-4, lr_backbone=1e-5, weight_decay=0.01)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["name"] == "head" and group["lr"] == 1e-4 and group["weight_decay"] == 0.01
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in head.parameters())


def test_trainable_backbone_parameters_get_their_own_learning_rate():
    head, backbone = Stage1Head(8), nn.Linear(4, 4)
    backbone.bias.requires_grad_(False)
    opt = build_adamw(head, backbone, lr_head=1e-3, lr_backbone=1e-5, weight_decay=0.05)
    assert [g["name"] for g in opt.param_groups] == ["head", "backbone"]
    assert opt.param_groups[1]["lr"] == 1e-5 and opt.param_groups[1]["params"] == [backbone.weight]


def test_a_head_without_trainable_parameters_is_refused():
    head = Stage1Head(8).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(head, None, 1e-4, 1e-5, 0.0)
