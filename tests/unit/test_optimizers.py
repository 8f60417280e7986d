"""AdamW settings, parameter groups (head / backbone, layer-wise LR decay), SAM and F-SAM."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from stage1_core.model.head import Stage1Head
from stage1_core.training.optimizers import (
    OPTIMIZERS,
    SAM,
    FriendlySAM,
    build_adamw,
    build_optimizer,
    default_layer_of,
    layerwise_param_groups,
    param_groups,
    sam_accumulated_step,
)


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



def _param(values) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _sgd_sam(params, lr=0.1, cls=SAM, **kwargs):
    base = torch.optim.SGD(params, lr=lr)
    return cls(params, base, **kwargs)


@pytest.mark.parametrize("mode", ["closure", "two_steps"])
def test_one_sam_step_on_a_quadratic_matches_the_closed_form(mode):
    w = _param([3.0, -4.0, 1.0])
    w0 = w.detach().clone()
    lr, rho = 0.1, 0.05
    opt = _sgd_sam([w], lr=lr, rho=rho)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w.pow(2).sum()
        loss.backward()
        return loss

    if mode == "closure":
        loss = opt.step(closure)
        assert loss.item() == pytest.approx(0.5 * float(w0.pow(2).sum()))
    else:
        closure()
        opt.first_step()
        assert w.grad is None
        closure()
        opt.second_step()
    expected = w0 * (1 - lr * (1 + rho / w0.norm()))
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
    assert opt.num_steps == 1 and not opt.is_perturbed


def test_sam_perturbs_with_the_global_norm_and_skips_parameters_without_gradient():
    a, b, c = _param([1.0, 2.0]), _param([-1.0, 0.5, 3.0]), _param([7.0])
    a0, b0, c0 = (t.detach().clone() for t in (a, b, c))
    lr, rho = 0.5, 0.2
    opt = _sgd_sam([a, b, c], lr=lr, rho=rho)
    ga, gb = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64)
    a.grad, b.grad = ga.clone(), gb.clone()  # c.grad stays None: the reference code crashes here
    opt.first_step(zero_grad=False)
    torch.testing.assert_close(a.detach() - a0, rho * ga / 5.0, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(b.detach() - b0, rho * gb / 5.0, rtol=1e-10, atol=1e-15)
    assert torch.equal(c.detach(), c0) and "old_p" not in opt.state[c]
    # At w + e only ``a`` receives a gradient: ``b`` must still be moved back to its saved value.
    opt.zero_grad()
    a.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.second_step()
    torch.testing.assert_close(a.detach(), a0 - lr * torch.tensor([1.0, -1.0], dtype=torch.float64), rtol=0, atol=0)
    assert torch.equal(b.detach(), b0) and torch.equal(c.detach(), c0)


def test_adaptive_sam_scales_the_perturbation_by_the_weights():
    w, v = _param([1.0, -2.0, 0.5]), _param([3.0])  # the eps (1e-12) in ||w * g|| + eps bounds rtol
    w0, v0 = w.detach().clone(), v.detach().clone()
    rho = 2.0
    opt = _sgd_sam([w, v], rho=rho, adaptive=True)
    gw = torch.tensor([0.3, 0.1, -2.0], dtype=torch.float64)
    gv = torch.tensor([0.4], dtype=torch.float64)
    w.grad, v.grad = gw.clone(), gv.clone()
    opt.first_step()
    norm = torch.cat([w0 * gw, v0 * gv]).norm()
    torch.testing.assert_close(w.detach() - w0, rho * w0**2 * gw / norm, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(v.detach() - v0, rho * v0**2 * gv / norm, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("cls", [SAM, FriendlySAM])
def test_a_zero_gradient_gives_no_perturbation_and_no_nan(cls):
    w = _param([1.0, -2.0])
    opt = _sgd_sam([w], cls=cls)
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.first_step(zero_grad=False)
        assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
        opt.second_step()
    assert torch.isfinite(w).all()


def test_friendly_sam_removes_the_gradient_momentum_from_the_ascent_direction():
    w = _param([0.5, -1.0, 2.0])
    w0 = w.detach().clone()
    rho, sigma, lmbda = 0.1, 0.5, 0.9
    opt = _sgd_sam([w], lr=0.0, cls=FriendlySAM, rho=rho, sigma=sigma, lmbda=lmbda)
    g1 = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    g2 = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    g3 = torch.tensor([-1.0, 1.0, 4.0], dtype=torch.float64)
    m = g1  # m_1 = g_1, not (1 - lmbda) g_1
    expected_directions = [g1, g2 - sigma * g1, g3 - sigma * (lmbda * g1 + (1 - lmbda) * g2)]
    for g, d in zip((g1, g2, g3), expected_directions):
        w.grad = g.clone()
        opt.first_step(zero_grad=False)
        torch.testing.assert_close(w.detach() - w0, rho * d / d.norm(), rtol=1e-10, atol=1e-15)
        assert torch.equal(w.grad, g)  # the clean gradient is left intact
        if g is not g1:
            m = lmbda * m + (1 - lmbda) * g
        torch.testing.assert_close(opt.state[w]["momentum"], m, rtol=0, atol=1e-15)
        w.grad = torch.ones_like(w)
        opt.second_step()
        assert torch.equal(w.detach(), w0)  # lr = 0: back at w exactly


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Linear(2, 2, bias=False)
        self.layer = nn.ModuleList([nn.Linear(2, 2, bias=False) for _ in range(3)])
        self.norm = nn.LayerNorm(2)


def test_layerwise_groups_decay_the_learning_rate_towards_the_input():
    model = _Tiny()
    model.layer[0].weight.requires_grad_(False)
    groups = layerwise_param_groups(model.named_parameters(), 1e-2, 0.5, 3, 0.05)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["embeddings", "layer_1", "layer_2", "other"]
    assert by_name["embeddings"]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert by_name["layer_1"]["lr"] == pytest.approx(1e-2 * 0.5)
    assert by_name["layer_2"]["lr"] == pytest.approx(1e-2)
    assert by_name["other"]["lr"] == 1e-2
    assert by_name["layer_1"]["params"] == [model.layer[1].weight]
    assert by_name["other"]["params"] == [model.norm.weight, model.norm.bias]
    assert all(g["weight_decay"] == 0.05 for g in groups)
    off = layerwise_param_groups(model.named_parameters(), 1e-2, 1.0, 3, 0.0)
    assert len(off) == 1 and off[0]["name"] == "all" and off[0]["lr"] == 1e-2 and len(off[0]["params"]) == 5
    custom = layerwise_param_groups(model.named_parameters(), 1.0, 0.1, 2, 0.0, layer_of=lambda n: 0)
    assert [(g["name"], g["lr"]) for g in custom] == [("layer_0", pytest.approx(0.1))]
    with pytest.raises(ValueError, match="outside"):
        layerwise_param_groups(model.named_parameters(), 1e-2, 0.5, 2, 0.0)


def test_default_layer_parsing_understands_hf_dinov3_and_peft_names():
    assert default_layer_of("model.layer.11.attention.q_proj.lora_A.default.weight") == 11
    assert default_layer_of("base_model.model.layer.3.layer_scale1.lambda1") == 3
    assert default_layer_of("embeddings.patch_embeddings.weight") == -1
    assert default_layer_of("base_model.model.embeddings.register_tokens") == -1
    assert default_layer_of("norm.weight") is None
    assert default_layer_of("trunk.0.weight") is None


def test_sam_respects_per_group_learning_rates():
    model = _Tiny()
    groups = layerwise_param_groups(model.named_parameters(), 1e-2, 0.5, 3, 0.0)
    opt = build_optimizer("sam", groups, lr=1.0, weight_decay=0.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.first_step()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.second_step()
    for group in opt.param_groups:
        for p in group["params"]:
            # First AdamW step with weight decay 0 moves by lr * g / (|g| + eps).
            torch.testing.assert_close(p.detach() - before[id(p)], torch.full_like(p, -group["lr"]), rtol=0, atol=1e-7)


def test_build_optimizer_gives_adamw_sam_and_fsam_with_the_baseline_base():
    groups = [{"params": [nn.Parameter(torch.zeros(3))], "lr": 1e-3, "name": "head"}]
    adamw = build_optimizer("adamw", groups, lr=1e-4, weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["lr"] == 1e-3
    assert adamw.param_groups[0]["betas"] == (0.9, 0.999) and adamw.param_groups[0]["eps"] == 1e-8
    sam = build_optimizer("SAM", groups, lr=1e-4, weight_decay=0.01, rho=0.1, adaptive=True)
    assert type(sam) is SAM and type(sam.base_optimizer) is torch.optim.AdamW
    assert sam.param_groups is sam.base_optimizer.param_groups
    assert sam.param_groups[0]["rho"] == 0.1 and sam.param_groups[0]["adaptive"] is True
    assert sam.param_groups[0]["weight_decay"] == 0.01 and sam.param_groups[0]["betas"] == (0.9, 0.999)
    fsam = build_optimizer("fsam", groups, lr=1e-4, weight_decay=0.0, sigma=0.5, lmbda=0.95)
    assert type(fsam) is FriendlySAM and fsam.param_groups[0]["sigma"] == 0.5 and fsam.param_groups[0]["lmbda"] == 0.95
    assert set(groups[0]) == {"params", "lr", "name"}  # the caller's dicts are not modified
    assert set(OPTIMIZERS) == {"adamw", "sam", "fsam"}


def test_build_optimizer_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; known: adamw, fsam, sam"):
        build_optimizer("lion", [{"params": [nn.Parameter(torch.zeros(1))]}], lr=1e-3, weight_decay=0.0)


def test_sam_refuses_a_base_optimizer_over_other_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="exactly the parameters"):
        SAM([a], torch.optim.SGD([a, b], lr=0.1))
    with pytest.raises(TypeError, match="instance"):
        SAM([a], torch.optim.SGD)


def _regression_data(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def _mlp(seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _make(kind, model):
    if kind == "fsam-adamw":
        return build_optimizer("fsam", [{"params": list(model.parameters())}], lr=1e-2, weight_decay=0.01, rho=0.1)
    params = list(model.parameters())
    return SAM(params, torch.optim.SGD(params, lr=0.05), rho=0.1)


@pytest.mark.parametrize("kind", ["fsam-adamw", "sam-sgd"])
def test_accumulating_micro_batches_equals_one_step_on_the_concatenated_batch(kind):
    x, y = _regression_data()
    big, small = _mlp(), _mlp()
    opt_big, opt_small = _make(kind, big), _make(kind, small)

    def loss_fn(model):
        return lambda batch: (model(batch[0]).squeeze(-1) - batch[1]).pow(2).mean()

    micro = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    for _ in range(3):
        # Reference: the full batch, done by hand.
        opt_big.zero_grad()
        ref_loss = loss_fn(big)((x, y))
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(big.parameters(), 0.5)
        opt_big.first_step()
        loss_fn(big)((x, y)).backward()
        torch.nn.utils.clip_grad_norm_(big.parameters(), 0.5)
        opt_big.second_step()
        loss, norm = sam_accumulated_step(opt_small, loss_fn(small), micro, max_grad_norm=0.5)
        assert loss == pytest.approx(ref_loss.item(), abs=1e-6) and norm == pytest.approx(ref_norm.item(), abs=1e-6)
        assert norm > 0.5  # the clipping is active
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in small.parameters())
    moved = sum((p - q).abs().sum().item() for p, q in zip(small.parameters(), _mlp().parameters()))
    assert moved > 1e-3


def _train(model, opt, sched, x, y, steps, start):
    for step in range(start, start + steps):
        idx = torch.arange(8) + (step % 4) * 2
        micro = [(x[idx[:4]], y[idx[:4]]), (x[idx[4:]], y[idx[4:]])]
        sam_accumulated_step(
            opt, lambda b: (model(b[0]).squeeze(-1) - b[1]).pow(2).mean(), micro, max_grad_norm=1.0
        )
        sched.step()


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_resume_from_a_checkpoint_is_bit_identical(name):
    x, y = _regression_data()
    x, y = x.float(), y.float()

    def build(seed):
        model = _mlp(seed, torch.float32)
        groups = [
            {"params": list(model[0].parameters()), "lr": 5e-3, "name": "first"},
            {"params": list(model[2].parameters()), "lr": 1e-2, "name": "last"},
        ]
        opt = build_optimizer(name, groups, lr=1e-2, weight_decay=0.05, rho=0.1, lmbda=0.8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)
        return model, opt, sched

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # also: no scheduler-before-step warning
        ref_model, ref_opt, ref_sched = build(0)
        _train(ref_model, ref_opt, ref_sched, x, y, 6, 0)

        model, opt, sched = build(0)
        _train(model, opt, sched, x, y, 3, 0)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
        buffer.seek(0)
        ckpt = torch.load(buffer, weights_only=True)
        model, opt, sched = build(1)  # other init: everything must come from the checkpoint
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        assert opt.param_groups is opt.base_optimizer.param_groups
        _train(model, opt, sched, x, y, 3, 3)

    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert opt.num_steps == ref_opt.num_steps == 6
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    if name == "fsam":
        for p, q in zip(ref_model.parameters(), model.parameters()):
            assert torch.equal(ref_opt.state[p]["momentum"], opt.state[q]["momentum"])


def test_state_dicts_of_other_optimizers_and_mid_step_checkpoints_are_refused():
    w = nn.Parameter(torch.ones(2))
    sam = SAM([w], torch.optim.AdamW([w]))
    fsam = FriendlySAM([w], torch.optim.AdamW([w]))
    with pytest.raises(ValueError, match="base_optimizer"):
        sam.load_state_dict(torch.optim.AdamW([w]).state_dict())
    with pytest.raises(ValueError, match="written by 'SAM'"):
        fsam.load_state_dict(sam.state_dict())
    w.grad = torch.ones(2)
    sam.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        sam.state_dict()
    with pytest.raises(RuntimeError, match="twice"):
        sam.first_step()


@pytest.mark.parametrize("overflow", [None, "clean", "perturbed"])
def test_grad_scaler_steps_match_fp32_and_overflows_skip_the_update(overflow):
    x, y = _regression_data()
    x, y = x.float(), y.float()
    ref, model = _mlp(0, torch.float32), _mlp(0, torch.float32)
    ref_opt = build_optimizer("fsam", [{"params": list(ref.parameters())}], lr=1e-2, weight_decay=0.0)
    opt = build_optimizer("fsam", [{"params": list(model.parameters())}], lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]

    def loss_of(net, blow_up):
        def f(batch):
            loss = (net(batch[0]).squeeze(-1) - batch[1]).pow(2).mean()
            return loss * math.inf if blow_up() else loss
        return f

    sam_accumulated_step(ref_opt, loss_of(ref, lambda: False), micro)
    sam_accumulated_step(opt, loss_of(model, lambda: False), micro, scaler=scaler)
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert scaler.get_scale() == 2.0**10

    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum"].clone() for p in model.parameters()]
    blow_up = {
        None: lambda: False,
        "clean": lambda: not opt.is_perturbed,
        "perturbed": lambda: opt.is_perturbed,
    }[overflow]
    loss, norm = sam_accumulated_step(opt, loss_of(model, blow_up), micro, scaler=scaler, max_grad_norm=1.0)
    changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if overflow is None:
        assert changed and math.isfinite(norm) and opt.num_steps == 2 and scaler.get_scale() == 2.0**10
    else:
        assert not changed and not math.isfinite(norm) and opt.num_steps == 1
        assert scaler.get_scale() == 2.0**9 and not opt.is_perturbed
        same_momentum = all(torch.equal(opt.state[p]["momentum"], m) for p, m in zip(model.parameters(), momentum))
        assert same_momentum == (overflow == "clean")
    assert math.isfinite(loss) == (overflow != "clean")
    sam_accumulated_step(opt, loss_of(model, lambda: False), micro, scaler=scaler)  # the scaler is ready again


def test_training_optimizer_gives_the_head_its_lr_and_backbone_adapters_layer_wise_lrs():
    from stage1_core.config import Stage1ProConfig
    from stage1_core.model.head import Stage1Head
    from stage1_core.model.peft import apply_lora
    from stage1_core.training.optimizers import FriendlySAM, build_adamw, build_training_optimizer
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    backbone = apply_lora(DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                         intermediate_size=64, image_size=32)), 2, 2)
    head = Stage1Head(32, 0.0)
    cfg = Stage1ProConfig(lr_head=1e-3, lr_backbone=1e-4, layer_lr_decay=0.5, phase=5, optimizer="fsam", sam_rho=0.1)
    optimizer = build_training_optimizer(cfg, head, backbone)
    assert isinstance(optimizer, FriendlySAM)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"head": 1e-3, "backbone_layer_1": 1e-4 * 0.5, "backbone_layer_2": 1e-4}
    assert all(g["rho"] == 0.1 for g in optimizer.param_groups)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in [*head.parameters(), *(p for p in backbone.parameters() if p.requires_grad)]}
    # Without adapters and with AdamW it is exactly the baseline's optimiser.
    plain = build_training_optimizer(Stage1ProConfig(lr_head=1e-3), head)
    reference = build_adamw(head, lr_head=1e-3, lr_backbone=1e-5, weight_decay=0.01)
    assert type(plain) is type(reference) and plain.defaults == reference.defaults
    assert [g["name"] for g in plain.param_groups] == ["head"]
