"""Conformal risk training: in-batch CRC threshold, its smoothing, and a toy training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1_core.calibration.threshold_sweep import certify_score_threshold
from stage1_core.training.risk_training import ConformalRiskTrainingLoss, crc_index


def _batch(n=600, seed=0, pos_rate=0.7):
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < pos_rate).long()
    preds = torch.where(torch.rand(n, generator=gen) < 0.9, labels, 1 - labels)
    scores = torch.rand(n, generator=gen)
    scores = torch.where((labels == 1) & (preds == 0), scores * 0.5, scores)  # misses score lower
    return scores, preds, labels


def _brute_force_k_star(misses_sorted, target, correction=True):
    best = 0
    for k in range(1, len(misses_sorted) + 1):
        m = sum(misses_sorted[:k])
        ratio = (m + 1) / (k + 1) if correction else m / k
        if ratio <= target:
            best = k
    return best


def test_crc_index_on_a_known_sequence():
    misses = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1, 1], dtype=torch.float32)
    assert crc_index(misses, 0.25) == 7  # (M+1)/(k+1): 1/2 1/3 1/4 2/5 2/6 2/7 2/8 3/9 4/10
    assert crc_index(misses, 0.25, crc_correction=False) == 8
    assert crc_index(misses, 0.01) == 0
    assert crc_index(torch.zeros(0), 0.1) == 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.uniform(size=300) < 0.03).astype(float)
        assert crc_index(torch.tensor(m), 0.02) == _brute_force_k_star(list(m), 0.02)


def test_threshold_is_the_hard_crc_threshold_without_smoothing():
    scores, preds, labels = _batch()
    pos = labels == 1
    s, miss = scores[pos], ((preds == 0) & pos)[pos].float()
    order = torch.argsort(s, descending=True)
    k_star = _brute_force_k_star(miss[order].tolist(), 0.02)
    assert 0 < k_star < int(pos.sum())
    tau = s[order][k_star].item()  # the critical miss: exit iff score > tau
    assert miss[order][k_star] == 1
    exact = ConformalRiskTrainingLoss(window=0.0)
    thr, k, hard = exact.smooth_threshold(s, miss)
    assert k == k_star and hard == tau and thr.item() == tau
    exited = s > thr
    assert (miss[exited].sum() + 1) / (exited.sum() + 1) <= 0.02
    # The default window averages a few order statistics around the critical miss.
    smooth = ConformalRiskTrainingLoss(window=0.01)
    thr_w, _, _ = smooth.smooth_threshold(s, miss)
    w = int(0.01 * s.numel())
    u = s[order]
    assert w >= 1 and u[k_star + w].item() <= thr_w.item() <= u[k_star - w].item()
    assert thr_w.item() == pytest.approx(u[k_star - w : k_star + w + 1].mean().item())


def test_smoothed_coverage_tends_to_the_hard_coverage_as_temperature_falls():
    scores, preds, labels = _batch(seed=1)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    gaps = []
    for temperature in (0.3, 0.03, 1e-4):
        _, fig = ConformalRiskTrainingLoss(temperature=temperature, fnr_penalty=0.0)(scores, preds, labels, gen())
        gaps.append(abs(fig["coverage_smooth"] - fig["coverage_hard"]))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 5e-3
    _, fig = ConformalRiskTrainingLoss(temperature=1e-4)(scores, preds, labels, gen())
    assert fig["threshold"] == fig["hard_threshold"] or abs(fig["threshold"] - fig["hard_threshold"]) < 0.05


def test_gradient_reaches_scores_through_the_threshold():
    scores, preds, labels = _batch(seed=2)
    scores = scores.clone().requires_grad_(True)
    loss_fn = ConformalRiskTrainingLoss(fnr_penalty=0.0, window=0.01)
    loss, fig = loss_fn(scores, preds, labels, torch.Generator().manual_seed(3))
    assert not fig["skipped"] and loss.requires_grad
    loss.backward()
    cal, pred = loss_fn.split(labels, torch.Generator().manual_seed(3))
    cal_grad = scores.grad[cal]
    # Pseudo-calibration scores enter the loss only through the threshold: a window of the
    # positives' order statistics gets a positive gradient (lower threshold, more coverage).
    touched = cal_grad != 0
    w = int(0.01 * int((labels[cal] == 1).sum()))
    assert int(touched.sum()) == 2 * w + 1
    assert (cal_grad[touched] > 0).all() and (labels[cal][touched] == 1).all()
    assert (scores.grad[pred] < 0).all()  # more coverage on the prediction part: scores up
    cal_pos = cal[labels[cal] == 1]
    thr, _, _ = loss_fn.smooth_threshold(scores[cal_pos], (preds[cal_pos] == 0).float())
    assert thr.requires_grad and thr.grad_fn is not None


def test_split_is_stratified_disjoint_and_deterministic():
    _, _, labels = _batch(n=1000, seed=4)
    loss_fn = ConformalRiskTrainingLoss(fraction=0.5, min_calib=200)
    cal, pred = loss_fn.split(labels, torch.Generator().manual_seed(0))
    cal2, pred2 = loss_fn.split(labels, torch.Generator().manual_seed(0))
    assert torch.equal(cal, cal2) and torch.equal(pred, pred2)
    cal3, _ = loss_fn.split(labels, torch.Generator().manual_seed(1))
    assert not torch.equal(torch.sort(cal).values, torch.sort(cal3).values)
    both = torch.cat([cal, pred])
    assert torch.equal(torch.sort(both).values, torch.arange(1000))
    assert abs(cal.numel() - 500) <= 2
    rate = labels.float().mean().item()
    assert labels[cal].float().mean().item() == pytest.approx(rate, abs=0.005)
    big, _ = ConformalRiskTrainingLoss(fraction=0.1, min_calib=300).split(labels)
    assert abs(big.numel() - 300) <= 2  # min_calib wins over fraction


def test_too_few_positives_skip_the_batch_with_a_zero_loss():
    scores, preds, labels = _batch(n=120, seed=5)
    scores = scores.clone().requires_grad_(True)
    loss_fn = ConformalRiskTrainingLoss(min_calib=60)
    loss, fig = loss_fn(scores, preds, labels)
    assert fig["skipped"] and fig["n_calib_positives"] < loss_fn.min_calib_positives == 49
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(scores.grad) == 0
    with pytest.raises(ValueError, match="differ in length"):
        loss_fn(scores[:10], preds, labels)


def test_bad_settings_are_refused():
    for kwargs in ({"target_fnr": 0.0}, {"temperature": 0.0}, {"fraction": 1.0}, {"min_calib": 0}, {"window": 0.5}):
        with pytest.raises(ValueError):
            ConformalRiskTrainingLoss(**kwargs)


def _toy(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    preds = (x[:, 0] > 0).long()
    noisy = x[:, 1] > 0.5  # random labels there: every miss of a fixed classifier lives here
    labels = torch.where(noisy, (torch.rand(n, generator=gen) < 0.5).long(), preds)
    return x, preds, labels


def _adam_step(params, state, lr, t, betas=(0.9, 0.999), eps=1e-8):
    """A plain Adam update (torch.optim's constructor imports torch._dynamo: seconds per process)."""
    with torch.no_grad():
        for p in params:
            m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
            p.sub_(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
            p.grad = None


@pytest.mark.parametrize(
    ("init", "fnr_penalty"),
    [((0.0, 1.0), 1.0), ((0.3, 0.3), 0.0)],  # default loss from a bad start; the pure form from a fair one
)
def test_training_a_toy_score_raises_certified_coverage(init, fnr_penalty):
    x_train, p_train, y_train = _toy(20000, 0)
    x_held, p_held, y_held = _toy(5000, 1)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([init]))
        model.bias.zero_()

    def certified_coverage() -> float:
        with torch.no_grad():
            z = model(x_held).squeeze(-1).double().numpy()  # rank by the logit: no float32 ties at 1
        return certify_score_threshold(z, p_held.numpy(), y_held.numpy(), 0.02, 0.05).coverage

    before = certified_coverage()
    loss_fn = ConformalRiskTrainingLoss(fnr_penalty=fnr_penalty)
    gen = torch.Generator().manual_seed(0)
    params, state = list(model.parameters()), {}
    for t in range(1, 101):
        idx = torch.randint(0, x_train.shape[0], (512,), generator=gen)
        scores = torch.sigmoid(model(x_train[idx]).squeeze(-1))
        loss, fig = loss_fn(scores, p_train[idx], y_train[idx], gen)
        assert not fig["skipped"]
        loss.backward()
        _adam_step(params, state, 0.05, t)
    after = certified_coverage()
    assert before < 0.05 and after > before + 0.4, (before, after)


# ----- the phase-6 head loss and its registration ---------------------------------------------


def _head_output(n=512, seed=0, pos_rate=0.9):
    from stage1_core.model.head import Stage1Head

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < pos_rate).long()
    x = torch.randn(n, 8, generator=gen) + labels[:, None].float()
    head = Stage1Head(8, 0.0, with_gate=True)
    return head, head(x), labels


def test_head_loss_adds_the_weighted_terms_and_trains_the_gate():
    from stage1_core.training.losses import build_criterion
    from stage1_core.training.risk_training import ConformalRiskHeadLoss

    head, out, labels = _head_output()
    crt = ConformalRiskTrainingLoss(target_fnr=0.02)
    loss = ConformalRiskHeadLoss(build_criterion(labels, 0.0, weighted=False), crt, crt_weight=2.0, aux_weight=0.5,
                                 batch_size=512)
    torch.manual_seed(3)
    parts = loss.components(out, labels)
    assert torch.allclose(parts["total"], parts["cls"] + 0.5 * parts["aux"] + 2.0 * parts["crt"])
    assert not loss.last_figures["skipped"] and loss.n_calls == 1 and loss.n_skipped == 0
    torch.manual_seed(3)
    total = loss(out, labels)
    assert torch.isfinite(total) and set(loss.last_components) == {"total", "cls", "aux", "crt"}
    total.backward()
    assert head.gate.weight.grad is not None and head.gate.weight.grad.abs().sum() > 0
    # The CRT term alone never reaches the class head: its answers are hard argmax predictions.
    head.zero_grad()
    _, out2, _ = _head_output()
    torch.manual_seed(3)
    crt_only = ConformalRiskHeadLoss(build_criterion(labels, 0.0, weighted=False), crt, crt_weight=1.0, aux_weight=0.0)
    crt_only.components(out2, labels)["crt"].backward()
    assert out2.logits.grad_fn is not None and head.cls.weight.grad is None


def test_head_loss_needs_the_gated_head_and_counts_skipped_batches():
    from stage1_core.model.head import HeadOutput
    from stage1_core.training.risk_training import ConformalRiskHeadLoss

    crt = ConformalRiskTrainingLoss(target_fnr=0.02)
    loss = ConformalRiskHeadLoss(torch.nn.CrossEntropyLoss(), crt)
    labels = torch.ones(40, dtype=torch.long)
    with pytest.raises(ValueError, match="gated head"):
        loss(HeadOutput(torch.randn(40, 2), None, torch.randn(40, 2)), labels)
    out = HeadOutput(torch.randn(40, 2, requires_grad=True), torch.randn(40, requires_grad=True), torch.randn(40, 2))
    assert torch.isfinite(loss(out, labels)) and loss.n_skipped == 1  # 40 samples: no pseudo-prediction half
    with pytest.raises(ValueError, match="crt_weight"):
        ConformalRiskHeadLoss(torch.nn.CrossEntropyLoss(), crt, crt_weight=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ConformalRiskHeadLoss(torch.nn.CrossEntropyLoss(), crt, batch_size=1)


def test_batch_check_refuses_halves_that_cannot_calibrate():
    from stage1_core.training.risk_training import check_crt_batch

    crt = ConformalRiskTrainingLoss(target_fnr=0.02, fraction=0.5, min_calib=200)
    check_crt_batch(512, 0.8, crt)
    check_crt_batch(256, 0.8, crt)  # max(128, 200) = 200 calibrate, 56 predict
    with pytest.raises(ValueError, match="no pseudo-prediction half"):
        check_crt_batch(200, 0.8, crt)
    with pytest.raises(ValueError, match="raise crt_batch_size"):
        check_crt_batch(512, 0.2, crt)  # ~51 calibration positives expected, 74 wanted


def test_crt_is_registered_and_the_trainer_slices_its_batch(tmp_path):
    from stage1_core.config import Stage1ProConfig
    from stage1_core.features import TensorSplit
    from stage1_core.training.recipes import build_loss
    from stage1_core.training.risk_training import ConformalRiskHeadLoss
    from stage1_core.training.trainer import train_head

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=gen)
    y = (x[:, 0] + 0.5 * torch.randn(1000, generator=gen) > -1.3).long()
    train = TensorSplit(x[:800], y[:800], None, "train")
    val = TensorSplit(x[800:], y[800:], None, "val_select")
    config = Stage1ProConfig(epochs=2, warmup_epochs=0, max_batch_size=16, fallback_batch_size=8, grad_accum_steps=1,
                             use_amp=False,
                             crt_batch_size=400, class_weighting="none", early_stop_patience=5)
    loss = build_loss("crt", config, train.labels)
    assert isinstance(loss, ConformalRiskHeadLoss) and loss.batch_size == 400
    result = train_head(config, train, val, tmp_path, loss_fn=loss, with_gate=True, progress=False)
    assert result.global_step == 2 * (800 // 400) and result.losses_finite  # crt_batch_size, not max_batch_size
    assert loss.n_calls == 4 and loss.n_skipped == 0
    with pytest.raises(ValueError, match="crt_batch_size"):
        build_loss("crt", config.with_updates(crt_batch_size=150), train.labels)
