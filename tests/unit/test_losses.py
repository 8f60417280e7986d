"""Class weights and the class-weighted, label-smoothed cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1_core.training.losses import build_criterion, class_weights


def test_class_weights_are_the_baseline_formula():
    labels = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    counts = np.bincount(labels.numpy())
    expected = len(labels) / (len(counts) * counts + 1e-6)  # the baseline's expression
    weights = class_weights(labels)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))
    assert weights[0].item() == pytest.approx(10 / 4, rel=1e-6) and weights[1].item() == pytest.approx(10 / 16, rel=1e-6)


def test_a_missing_class_is_an_error():
    with pytest.raises(ValueError, match=r"no sample of class\(es\) \[0\]"):
        class_weights(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        class_weights(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        class_weights(torch.tensor([], dtype=torch.long))


def test_criterion_matches_manual_weighted_smoothed_cross_entropy():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 1, 1, 0, 1])
    logits = torch.randn(6, 2)
    criterion = build_criterion(labels, label_smoothing=0.1)
    w = class_weights(labels)
    eps, k = 0.1, 2
    logp = torch.log_softmax(logits, dim=1)
    target = torch.full((6, 2), eps / k)
    target[torch.arange(6), labels] += 1 - eps
    per_sample = -(target * logp * w).sum(dim=1)
    manual = per_sample.sum() / w[labels].sum()
    assert criterion(logits, labels).item() == pytest.approx(manual.item(), rel=1e-6)
    assert criterion.label_smoothing == 0.1
    assert build_criterion(labels, 0.0, weighted=False).weight is None


# Phase 3: selective (gate) losses.

from stage1_core.model.head import HeadOutput, Stage1Head  # noqa: E402
from stage1_core.training.losses import AuxiliaryLoss, GateHeadLoss, SelectiveLoss  # noqa: E402


def _gated_batch(n=64, hidden=4, seed=0):
    torch.manual_seed(seed)
    head = Stage1Head(hidden, dropout=0.0, with_gate=True)
    x = torch.randn(n, hidden)
    y = (torch.rand(n) < 0.6).long()
    return head, x, y


def test_selective_loss_components_match_their_formulas():
    torch.manual_seed(1)
    logits, gate, aux = torch.randn(8, 2), torch.randn(8), torch.randn(8, 2)
    y = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0])
    out = HeadOutput(logits, gate, aux)
    loss = SelectiveLoss(target_fnr=0.02, coverage_weight=0.7, fnr_penalty=50.0, aux_weight=0.5, miss_temperature=1.0)
    parts = loss(out, y)
    g = torch.sigmoid(gate)
    p0 = torch.softmax(logits, 1)[:, 0]
    pos = y == 1
    fnr = (g[pos] * p0[pos]).sum() / (g[pos].sum() + 1e-6)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    risk = (ce * g).mean() / (g.mean() + 1e-6)
    objective = risk - 0.7 * g.mean() + 50.0 * torch.relu(fnr - 0.02) ** 2
    aux_ce = torch.nn.functional.cross_entropy(aux, y)
    assert parts["coverage"].item() == pytest.approx(g.mean().item(), rel=1e-6)
    assert parts["fnr_soft"].item() == pytest.approx(fnr.item(), rel=1e-6)
    assert parts["selective_risk"].item() == pytest.approx(risk.item(), rel=1e-6)
    assert parts["objective"].item() == pytest.approx(objective.item(), rel=1e-6)
    assert parts["aux"].item() == pytest.approx(aux_ce.item(), rel=1e-6)
    assert parts["total"].item() == pytest.approx(objective.item() + 0.5 * aux_ce.item(), rel=1e-6)
    hard = SelectiveLoss(miss_temperature=0.0)(out, y)["fnr_soft"]
    miss = (logits[:, 0] > logits[:, 1]).float()
    assert hard.item() == pytest.approx(((g * miss)[pos].sum() / (g[pos].sum() + 1e-6)).item(), rel=1e-6)


def test_soft_gate_passes_gradients_to_gate_and_trunk_a_hard_mask_does_not():
    head, x, y = _gated_batch()
    out = head(x)
    SelectiveLoss(aux_weight=0.0)(out, y)["objective"].backward()
    assert head.gate.weight.grad is not None and head.gate.weight.grad.abs().sum() > 0
    assert head.trunk[0].weight.grad.abs().sum() > 0
    assert head.aux.weight.grad is None  # aux_weight=0 and "objective" excludes aux
    # A hard acceptance mask (the deployed rule) is piecewise constant: no gradient path at all.
    hard_mask = (torch.sigmoid(head(x).gate) >= 0.5).float()
    assert not hard_mask.requires_grad and hard_mask.grad_fn is None


def test_detached_miss_keeps_the_fnr_term_off_the_class_head():
    head, x, y = _gated_batch(seed=2)
    only_fnr = dict(coverage_weight=0.0, risk_weight=0.0, aux_weight=0.0, fnr_penalty=100.0, target_fnr=1e-3)
    SelectiveLoss(miss_temperature=1.0, **only_fnr)(head(x), y)["objective"].backward()
    assert head.cls.weight.grad is None or head.cls.weight.grad.abs().sum() == 0
    assert head.gate.weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    SelectiveLoss(miss_temperature=1.0, detach_miss=False, **only_fnr)(head(x), y)["objective"].backward()
    assert head.cls.weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    # Hard misses (the default, miss_temperature=0) are a step function: no gradient either way.
    SelectiveLoss(miss_temperature=0.0, detach_miss=False, **only_fnr)(head(x), y)["objective"].backward()
    assert head.cls.weight.grad is None or head.cls.weight.grad.abs().sum() == 0
    assert head.gate.weight.grad.abs().sum() > 0


def test_dual_multiplier_rises_with_excess_fnr_and_freezes_in_eval():
    logits = torch.tensor([[2.0, -2.0]] * 4 + [[-2.0, 2.0]] * 4)  # four positives predicted negative
    out = HeadOutput(logits, torch.zeros(8), torch.zeros(8, 2))
    y = torch.ones(8, dtype=torch.long)
    loss = SelectiveLoss(dual_lr=2.0, fnr_penalty=0.0, miss_temperature=0.0)
    first = loss(out, y)
    assert first["multiplier"].item() == 0.0 and first["fnr_soft"].item() == pytest.approx(0.5, rel=1e-5)
    assert loss.multiplier.item() == pytest.approx(2.0 * (0.5 - 0.02), rel=1e-5)
    second = loss(out, y)
    assert second["fnr_penalty"].item() == pytest.approx(loss.multiplier.item() / 2 * (0.5 - 0.02), rel=1e-4)
    loss.eval()
    frozen = loss.multiplier.item()
    loss(out, y)
    assert loss.multiplier.item() == frozen
    loss.train()
    clean = HeadOutput(torch.tensor([[-2.0, 2.0]] * 8), torch.zeros(8), torch.zeros(8, 2))
    for _ in range(60):
        loss(clean, y)
    assert loss.multiplier.item() == 0.0  # projected onto lambda >= 0


def test_gate_head_loss_is_the_documented_sum_and_logs_components():
    head, x, y = _gated_batch(seed=3)
    crit = build_criterion(y, label_smoothing=0.1)
    selective = SelectiveLoss(fnr_penalty=20.0)
    loss = GateHeadLoss(crit, selective, gate_loss_weight=0.8, aux_weight=0.3)
    out = head(x)
    total = loss(out, y)
    per_sample = torch.nn.functional.cross_entropy(
        out.logits, y, weight=crit.weight, label_smoothing=0.1, reduction="none"
    )
    sel = selective(out, y, cls_loss_per_sample=per_sample)["objective"]
    aux = AuxiliaryLoss(crit.weight, 0.1)(out, y)
    expected = crit(out.logits, y) + 0.8 * sel + 0.3 * aux
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    logged = loss.last_components
    assert set(logged) >= {"total", "cls", "selective", "aux", "selective_risk", "coverage", "fnr_soft"}
    assert all(isinstance(v, float) for v in logged.values())
    assert logged["total"] == pytest.approx(total.item(), rel=1e-6)


def _adam_step(params, state, lr, t, betas=(0.9, 0.999), eps=1e-8):
    """A plain Adam update (torch.optim's constructor imports torch._dynamo: seconds per process)."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
            p.sub_(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
            p.grad = None


def _fit(head, loss, x, y, steps, lr=3e-3, batch=128, seed=0):
    params, state = list(head.parameters()), {}
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss(head(x[idx]), y[idx]).backward()
        _adam_step(params, state, lr, t)


def test_gate_head_loss_falls_on_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(512, 2)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    head = Stage1Head(2, dropout=0.0, with_gate=True)
    loss = GateHeadLoss(build_criterion(y, 0.0), SelectiveLoss(fnr_penalty=100.0), gate_loss_weight=1.0, aux_weight=0.5)
    with torch.no_grad():
        before = loss(head(x), y).item()
    _fit(head, loss, x, y, steps=100)
    with torch.no_grad():
        after = loss(head(x), y).item()
        acc = (head(x).logits.argmax(1) == y).float().mean().item()
    assert after < before - 0.5, (before, after)
    assert acc > 0.95


def test_gate_learns_to_reject_a_region_with_random_labels():
    torch.manual_seed(0)
    x = torch.rand(2000, 2) * 2 - 1
    noisy = x[:, 0] > 0
    y = torch.where(noisy, (torch.rand(2000) < 0.5).long(), (x[:, 1] > 0).long())
    head = Stage1Head(2, dropout=0.0, with_gate=True)
    loss = GateHeadLoss(build_criterion(y, 0.0), SelectiveLoss(fnr_penalty=100.0), gate_loss_weight=1.0, aux_weight=0.5)
    _fit(head, loss, x, y, steps=150, batch=256)
    with torch.no_grad():
        g = torch.sigmoid(head(x).gate)
    clean_mean, noisy_mean = g[~noisy].mean().item(), g[noisy].mean().item()
    assert clean_mean > noisy_mean + 0.2 and clean_mean > 5 * noisy_mean, (clean_mean, noisy_mean)


def test_selective_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="target_fnr"):
        SelectiveLoss(target_fnr=0.0)
    with pytest.raises(ValueError, match="fnr_penalty"):
        SelectiveLoss(fnr_penalty=-1.0)
    with pytest.raises(ValueError, match="dual_lr"):
        SelectiveLoss(dual_lr=0.0)
    out = HeadOutput(torch.zeros(3, 2), torch.zeros(4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="gate has 4 entries"):
        SelectiveLoss()(out, torch.tensor([0, 1, 1]))


def test_the_selective_recipe_takes_every_gate_knob_from_the_config():
    from stage1_core.config import Stage1ProConfig
    from stage1_core.training.recipes import build_loss

    config = Stage1ProConfig(gate_fnr_penalty=200.0, gate_risk_weight=2.0, gate_miss_temperature=0.5,
                             gate_loss_weight=0.3, aux_weight=0.25, target_fnr_exit=0.03, class_weighting="none")
    loss = build_loss("selective", config, torch.tensor([0, 1, 1, 1]))
    selective = loss.selective
    assert (selective.fnr_penalty, selective.risk_weight, selective.miss_temperature) == (200.0, 2.0, 0.5)
    assert (selective.target_fnr, selective.aux_weight) == (0.03, 0.25)
    assert loss.gate_loss_weight == 0.3
    assert selective.correct_weight == 0.0  # off unless the config sets it
    assert build_loss("selective", config.with_updates(gate_correct_weight=7.0), torch.tensor([0, 1])).selective.correct_weight == 7.0
    with pytest.raises(ValueError, match="gate_miss_temperature"):
        Stage1ProConfig(gate_miss_temperature=-1.0)
    with pytest.raises(ValueError, match="gate_correct_weight"):
        Stage1ProConfig(gate_correct_weight=-1.0)
    with pytest.raises(ValueError, match="correct_weight"):
        SelectiveLoss(correct_weight=-0.5)


def test_correct_weight_adds_the_bce_of_the_gate_against_correct_predictions():
    torch.manual_seed(4)
    logits, gate, aux = torch.randn(10, 2), torch.randn(10), torch.randn(10, 2)
    y = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1])
    out = HeadOutput(logits, gate, aux)
    base = SelectiveLoss(fnr_penalty=50.0, risk_weight=3.0)(out, y)
    with_bce = SelectiveLoss(fnr_penalty=50.0, risk_weight=3.0, correct_weight=2.5)(out, y)
    correct = (logits.argmax(1) == y).float()
    p = torch.sigmoid(gate)
    bce = -(correct * torch.log(p) + (1 - correct) * torch.log(1 - p)).mean()
    assert with_bce["gate_correct"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert base["gate_correct"].item() == pytest.approx(bce.item(), rel=1e-5)  # logged even when off
    assert with_bce["objective"].item() == pytest.approx(base["objective"].item() + 2.5 * bce.item(), rel=1e-5)
    assert with_bce["total"].item() == pytest.approx(base["total"].item() + 2.5 * bce.item(), rel=1e-5)


def test_the_correct_term_still_moves_a_saturated_gate_off_wrong_predictions():
    # Every sample confidently accepted (sigmoid saturated); half of the predictions are wrong.
    logits = torch.tensor([[-3.0, 3.0]] * 8)
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    gate = torch.full((8,), 12.0, requires_grad=True)
    out = HeadOutput(logits, gate, torch.zeros(8, 2))
    SelectiveLoss(risk_weight=30.0, fnr_penalty=200.0)(out, y)["objective"].backward()
    assert gate.grad.abs().max().item() < 1e-3  # the selective terms pass almost nothing
    gate.grad = None
    SelectiveLoss(risk_weight=30.0, fnr_penalty=200.0, correct_weight=1.0)(out, y)["objective"].backward()
    wrong = y == 0
    assert torch.all(gate.grad[wrong] > 0.1 / 8)  # descent lowers the gate of the wrong ones
    assert gate.grad[~wrong].abs().max().item() < 1e-3


def test_a_gate_with_the_margin_input_learns_that_confident_predictions_are_correct():
    # Labels flip often near the class boundary and never far from it: "correct" is a function of
    # the confidence |z1 - z0|, which a gate linear in the trunk features cannot express.
    torch.manual_seed(0)
    x = torch.rand(3000, 2) * 2 - 1
    flip = torch.rand(3000) < 0.45 * (x[:, 0].abs() < 0.25).float()
    y = torch.where(flip, 1 - (x[:, 0] > 0).long(), (x[:, 0] > 0).long())
    head = Stage1Head(2, dropout=0.0, with_gate=True, gate_margin_input=True)
    loss = GateHeadLoss(build_criterion(y, 0.0, weighted=False),
                        SelectiveLoss(fnr_penalty=0.0, risk_weight=0.0, coverage_weight=0.0, correct_weight=1.0),
                        gate_loss_weight=1.0, aux_weight=0.5)
    _fit(head, loss, x, y, steps=300, batch=256, lr=1e-2)
    weight = head.gate_margin.weight.detach()
    assert weight[1].item() > 0.05, weight  # the |d| weight: more confident -> more likely correct
    with torch.no_grad():
        out = head(x)
    correct = out.logits.argmax(1) == y
    g = out.gate
    assert g[correct].mean() > g[~correct].mean() + 0.5
