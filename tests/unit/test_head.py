"""Stage1Head: layout, shapes, parameter count, gate extension, state-dict loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stage1_core.model.head import (
    HeadOutput,
    HeadStateError,
    Stage1Head,
    count_parameters,
    load_head_state_dict,
    maybe_compile,
    unwrap,
)

PHASE1_KEYS = ["input_mean", "input_std", "trunk.0.weight", "trunk.0.bias", "cls.weight", "cls.bias"]


def baseline_head(hidden: int, dropout: float) -> nn.Sequential:
    """The old script's head, for comparison."""
    return nn.Sequential(nn.Linear(hidden, 768), nn.ReLU(), nn.Dropout(dropout), nn.Linear(768, 2))


@pytest.mark.parametrize("hidden", [192, 384, 1280])
def test_phase1_layout_shapes_and_parameter_count(hidden):
    head = Stage1Head(hidden, dropout=0.3)
    assert list(head.state_dict()) == PHASE1_KEYS
    assert count_parameters(head) == hidden * 768 + 768 + 768 * 2 + 2
    assert count_parameters(head) == count_parameters(baseline_head(hidden, 0.3))
    assert [type(m) for m in head.trunk] == [nn.Linear, nn.ReLU, nn.Dropout]
    assert head.trunk[2].p == 0.3
    out = head(torch.randn(5, hidden))
    assert isinstance(out, torch.Tensor) and out.shape == (5, 2)


def test_head_computes_what_the_baseline_head_computes():
    head = Stage1Head(16, dropout=0.0).eval()
    old = baseline_head(16, 0.0).eval()
    load_head_state_dict(head, old.state_dict())
    x = torch.randn(7, 16)
    assert torch.equal(head(x), old(x))


def test_gated_head_extends_the_phase1_layout():
    head = Stage1Head(32, dropout=0.1, with_gate=True)
    keys = list(head.state_dict())
    assert keys[:6] == PHASE1_KEYS
    assert keys[6:] == ["gate.weight", "gate.bias", "aux.weight", "aux.bias", "gate_margin.weight"]
    out = head(torch.randn(4, 32))
    assert isinstance(out, HeadOutput)
    assert out.logits.shape == (4, 2) and out.gate.shape == (4,) and out.aux.shape == (4, 2)
    assert count_parameters(head) == count_parameters(Stage1Head(32)) + 768 + 1 + 768 * 2 + 2 + 2
    assert count_parameters(head, trainable_only=True) == count_parameters(head) - 2  # margin weights frozen
    with pytest.raises(HeadStateError, match=r"missing keys \['aux.bias', 'aux.weight', 'gate.bias', 'gate.weight'\]"):
        load_head_state_dict(head, Stage1Head(32).state_dict())


def test_state_dict_loads_with_or_without_compile_prefix():
    source = Stage1Head(8)
    prefixed = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    target = Stage1Head(8)
    load_head_state_dict(target, prefixed)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    compiled = maybe_compile(Stage1Head(8), enabled=True, backend="eager")
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")
    load_head_state_dict(compiled, source.state_dict())
    assert torch.equal(unwrap(compiled).cls.weight, source.cls.weight)
    load_head_state_dict(Stage1Head(8), compiled.state_dict())


def test_compile_is_optional_on_cpu():
    head = Stage1Head(8)
    assert maybe_compile(head, enabled=False) is head
    if not torch.cuda.is_available():
        assert maybe_compile(head, enabled=None) is head


def test_bad_state_dicts_name_the_offending_keys():
    head = Stage1Head(16)
    wrong = Stage1Head(24).state_dict()
    with pytest.raises(HeadStateError, match=r"model_best.pth: .*trunk.0.weight: file \(768, 24\) vs head \(768, 16\)"):
        load_head_state_dict(head, wrong, source="model_best.pth")
    extra = {**Stage1Head(16).state_dict(), "bogus.weight": torch.zeros(1)}
    with pytest.raises(HeadStateError, match=r"unexpected keys \['bogus.weight'\]"):
        load_head_state_dict(head, extra)
    partial = {k: v for k, v in Stage1Head(16).state_dict().items() if k != "cls.bias"}
    with pytest.raises(HeadStateError, match=r"missing keys \['cls.bias'\]"):
        load_head_state_dict(head, partial)
    with pytest.raises(HeadStateError, match="expected a state_dict"):
        load_head_state_dict(head, [1, 2, 3])  # type: ignore[arg-type]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="dropout"):
        Stage1Head(8, dropout=1.0)
    with pytest.raises(ValueError, match="hidden_size"):
        Stage1Head(0)


def test_input_standardization_is_identity_by_default_and_fixed_once_set():
    head = Stage1Head(4, dropout=0.0).eval()
    x = torch.randn(6, 4)
    assert torch.equal(head(x), head.cls(head.trunk(x)))
    train = torch.randn(50, 4, dtype=torch.float64) * torch.tensor([100.0, 1.0, 0.01, 5.0]) + 3.0
    head.set_input_standardization(train)
    standardized = (train - train.mean(0)) / train.std(0)
    torch.testing.assert_close(head.input_mean, train.mean(0).float())
    torch.testing.assert_close(head(train.float()), head.cls(head.trunk(standardized.float())), rtol=1e-5, atol=1e-5)
    constant = torch.ones(10, 4)
    head.set_input_standardization(constant)
    assert torch.all(head.input_std > 0) and torch.isfinite(head(constant)).all()
    assert not any(name.startswith("input_") for name, _ in head.named_parameters())
    with pytest.raises(ValueError, match=r"need features \[N >= 2, 4\]"):
        head.set_input_standardization(torch.randn(1, 4))


def test_state_dict_without_standardization_loads_as_identity_and_with_it_round_trips():
    source = Stage1Head(8)
    source.set_input_standardization(torch.randn(20, 8) * 3 + 1)
    target = Stage1Head(8)
    load_head_state_dict(target, source.state_dict())
    assert torch.equal(target.input_mean, source.input_mean) and torch.equal(target.input_std, source.input_std)
    without = {k: v for k, v in source.state_dict().items() if not k.startswith("input_")}
    load_head_state_dict(target, without)
    assert torch.equal(target.input_mean, torch.zeros(8)) and torch.equal(target.input_std, torch.ones(8))
    half = {k: v for k, v in source.state_dict().items() if k != "input_std"}
    with pytest.raises(HeadStateError, match=r"missing keys \['input_std'\]"):
        load_head_state_dict(target, half)


def test_gate_margin_input_starts_as_the_plain_linear_gate_and_reads_the_detached_margin():
    torch.manual_seed(0)
    plain = Stage1Head(16, dropout=0.0, with_gate=True).eval()
    torch.manual_seed(0)
    margin = Stage1Head(16, dropout=0.0, with_gate=True, gate_margin_input=True).eval()
    x = torch.randn(9, 16)
    # Zero-initialised without drawing random numbers: same weights, bit-identical gate.
    assert torch.equal(plain(x).gate, margin(x).gate)
    assert torch.equal(plain(x).gate, plain.gate(plain.trunk(x)).squeeze(-1))
    assert margin.gate_margin.weight.requires_grad and not plain.gate_margin.weight.requires_grad
    with torch.no_grad():
        margin.gate_margin.weight.copy_(torch.tensor([0.5, 2.0]))
    out = margin(x)
    d = out.logits[:, 1] - out.logits[:, 0]
    expected = margin.gate(margin.trunk(x)).squeeze(-1) + 0.5 * d + 2.0 * d.abs()
    assert torch.allclose(out.gate, expected, atol=1e-6)
    # The margin is detached: the gate's loss reaches the margin weights, never the class layer
    # through the margin path.
    margin.train()
    margin.gate.weight.requires_grad_(False)
    margin.trunk.requires_grad_(False)
    margin(x).gate.sum().backward()
    assert margin.gate_margin.weight.grad is not None and margin.gate_margin.weight.grad.abs().sum() > 0
    assert margin.cls.weight.grad is None
    with pytest.raises(ValueError, match="gate_margin_input"):
        Stage1Head(16, gate_margin_input=True)


def test_gated_state_dict_without_gate_margin_loads_as_zero():
    source = Stage1Head(12, dropout=0.0, with_gate=True, gate_margin_input=True).eval()
    old = {k: v for k, v in source.state_dict().items() if k != "gate_margin.weight"}
    target = Stage1Head(12, dropout=0.0, with_gate=True, gate_margin_input=True)
    with torch.no_grad():
        target.gate_margin.weight.fill_(3.0)
    load_head_state_dict(target, old)
    assert torch.equal(target.gate_margin.weight, torch.zeros(2))
    x = torch.randn(5, 12)
    assert torch.equal(target.eval()(x).gate, source(x).gate)
    trained = Stage1Head(12, dropout=0.0, with_gate=True, gate_margin_input=True)
    with torch.no_grad():
        trained.gate_margin.weight.copy_(torch.tensor([1.0, -1.0]))
    frozen = Stage1Head(12, dropout=0.0, with_gate=True)  # as bundles and loaders build it
    load_head_state_dict(frozen, trained.state_dict())
    assert torch.equal(frozen.gate_margin.weight, torch.tensor([1.0, -1.0]))
    with pytest.raises(HeadStateError, match="gate_margin.weight"):
        load_head_state_dict(Stage1Head(12, with_gate=True), {**trained.state_dict(), "gate_margin.weight": torch.zeros(3)})
