"""LoRA / DoRA (peft) and DoRAN on a small random DINOv3: placement, init, merge, trainability."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stage1_core.model.backbone import DINOv3Backbone
from stage1_core.model.peft import (
    DINOV3_TARGETS,
    DoRANLinear,
    adapted_module_names,
    adapters_disabled,
    apply_dora,
    apply_doran,
    apply_lora,
    default_targets,
    merge_adapters,
    resolve_blocks,
    trainable_parameter_report,
    verify_peft,
)

SMALL = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
    patch_size=16, num_register_tokens=2, image_size=32,
)


def small_model(seed: int = 0, **overrides) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    return DINOv3ViTModel(DINOv3ViTConfig(**{**SMALL, **overrides})).eval()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return small_model()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hidden(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


def perturb_adapters(model: nn.Module, seed: int = 3, scale: float = 0.05) -> None:
    """Move every trainable tensor away from its init, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


ADAPTERS = {
    "lora": lambda m, **kw: apply_lora(m, 4, kw.pop("blocks", 2), **kw),
    "dora": lambda m, **kw: apply_dora(m, 4, kw.pop("blocks", 2), **kw),
    "doran": lambda m, **kw: apply_doran(m, 4, kw.pop("blocks", 2), **kw),
    "doran_direct": lambda m, **kw: apply_doran(m, 4, kw.pop("blocks", 2), generator=False, **kw),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_output_at_init_equals_base_and_merge_equals_unmerged(kind, source, pixels):
    base = copy.deepcopy(source)
    adapted = ADAPTERS[kind](copy.deepcopy(source))
    assert (hidden(adapted, pixels) - hidden(base, pixels)).abs().max().item() <= 1e-6
    figures = verify_peft(base, adapted, pixels)
    assert figures["passed"], figures
    assert figures["init_max_abs_diff"] <= 1e-6

    perturb_adapters(adapted)
    moved = hidden(adapted, pixels)
    assert (moved - hidden(base, pixels)).abs().max().item() > 1e-3, "perturbed adapters must change the output"
    merged = merge_adapters(copy.deepcopy(adapted))
    assert not adapted_module_names(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(DINOV3_TARGETS))
    assert (hidden(merged, pixels) - moved).abs().max().item() <= 1e-5
    after = verify_peft(base, adapted, pixels)
    assert after["merged_max_abs_diff"] <= 1e-5 and after["disabled_max_abs_diff"] == 0.0
    assert after["init_max_abs_diff"] > 1e-3 and not after["passed"]


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_only_adapter_parameters_train_and_count_is_reported(kind, source):
    adapted = ADAPTERS[kind](copy.deepcopy(source))
    trainable = {n: p for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable
    adapter_words = ("lora_", "magnitude", "tau_raw", "doran_generators")
    assert all(any(w in n for w in adapter_words) and "base_layer" not in n for n in trainable), sorted(trainable)
    report = trainable_parameter_report(adapted)
    assert report["trainable"] == sum(p.numel() for p in trainable.values())
    assert report["total"] == sum(p.numel() for p in adapted.parameters())
    assert report["fraction"] == pytest.approx(report["trainable"] / report["total"])
    assert 0 < report["fraction"] < 1
    assert report["kind"] == kind.split("_")[0]
    # A gradient step reaches adapter parameters only.
    loss = adapted(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.square().mean()
    loss.backward()
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)


def test_lora_trainable_count_matches_rank_arithmetic(source):
    adapted = apply_lora(copy.deepcopy(source), 4, 1, targets=("q_proj", "v_proj"))
    h = SMALL["hidden_size"]
    assert trainable_parameter_report(adapted)["trainable"] == 2 * (4 * h + h * 4)
    dora = apply_dora(copy.deepcopy(source), 4, 1, targets=("q_proj", "v_proj"))
    assert trainable_parameter_report(dora)["trainable"] == 2 * (4 * h + h * 4 + h)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_blocks_int_selects_the_last_blocks_only(kind, source):
    adapted = ADAPTERS[kind](copy.deepcopy(source), blocks=2)
    names = adapted_module_names(adapted)
    expected = sorted(f"model.layer.{i}.{part}" for i in (1, 2) for part in (
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.up_proj", "mlp.down_proj"))
    assert names == expected
    assert not any(".layer.0." in n for n, p in adapted.named_parameters() if p.requires_grad)


def test_explicit_blocks_and_targets(source):
    adapted = apply_lora(copy.deepcopy(source), 2, [0, -1], targets=("q_proj", "v_proj"))
    assert adapted_module_names(adapted) == [
        "model.layer.0.attention.q_proj", "model.layer.0.attention.v_proj",
        "model.layer.2.attention.q_proj", "model.layer.2.attention.v_proj",
    ]
    assert resolve_blocks(source, 1) == [2]
    for bad in (0, 4, [3], []):
        with pytest.raises(ValueError):
            resolve_blocks(source, bad)
    with pytest.raises(ValueError, match="do not exist"):
        apply_lora(copy.deepcopy(source), 2, 1, targets=("gate_proj",))


def test_gated_mlp_adds_gate_proj():
    gated = small_model(use_gated_mlp=True)
    assert default_targets(gated) == DINOV3_TARGETS + ("gate_proj",)
    assert default_targets(small_model()) == DINOV3_TARGETS
    adapted = apply_dora(gated, 2, 1)
    assert "model.layer.2.mlp.gate_proj" in adapted_module_names(adapted)


def test_adapting_twice_is_refused(source):
    adapted = apply_lora(copy.deepcopy(source), 2, 1)
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_dora(adapted, 2, 1)
    doran = apply_doran(copy.deepcopy(source), 2, 1)
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_lora(doran, 2, 1)


def copy_dora_into_doran(dora_model: nn.Module, doran_model: nn.Module) -> int:
    """Copy A, B and the magnitude of every peft DoRA layer into the matching DoRAN layer."""
    peft_layers = dict(dora_model.base_model.model.named_modules())
    copied = 0
    with torch.no_grad():
        for name, layer in doran_model.named_modules():
            if isinstance(layer, DoRANLinear):
                source_layer = peft_layers[name]
                layer.lora_a.copy_(source_layer.lora_A["default"].weight)
                layer.lora_b.copy_(source_layer.lora_B["default"].weight)
                layer.magnitude.copy_(source_layer.lora_magnitude_vector["default"].weight)
                copied += 1
    return copied


def test_doran_with_zero_tau_and_direct_factors_equals_peft_dora(source, pixels):
    dora = apply_dora(copy.deepcopy(source), 4, 2, alpha=8)
    perturb_adapters(dora, scale=0.1)
    doran = apply_doran(copy.deepcopy(source), 4, 2, alpha=8, tau_init=0.0, generator=False)
    assert copy_dora_into_doran(dora, doran) == 12
    out_dora = dora(pixel_values=pixels).last_hidden_state
    out_doran = doran(pixel_values=pixels).last_hidden_state
    assert (out_dora - out_doran).abs().max().item() <= 1e-5
    assert (out_dora - hidden(copy.deepcopy(source), pixels)).abs().max().item() > 1e-2, "the comparison must not be trivial"
    # Same detached-norm semantics: identical gradients for A, B and the magnitude.
    out_dora.square().mean().backward()
    out_doran.square().mean().backward()
    peft_layers = dict(dora.base_model.model.named_modules())
    for name, layer in doran.named_modules():
        if isinstance(layer, DoRANLinear):
            ref = peft_layers[name]
            torch.testing.assert_close(layer.lora_a.grad, ref.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.lora_b.grad, ref.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.magnitude.grad, ref.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4)
    # A positive tau makes it differ again.
    with torch.no_grad():
        for layer in doran.modules():
            if isinstance(layer, DoRANLinear):
                layer.tau_raw.fill_(0.5)
    assert (doran(pixel_values=pixels).last_hidden_state - out_dora).abs().max().item() > 1e-4


def test_doran_tau_stays_non_negative_and_can_recover():
    torch.manual_seed(0)
    layer = DoRANLinear(nn.Linear(8, 6), r=2, tau_init=0.0, generator=None)
    optimizer = torch.optim.SGD([layer.tau_raw], lr=1.0)
    (1e6 * layer.tau).backward()  # a huge push towards negative tau
    optimizer.step()
    assert layer.tau_raw.item() < 0 and layer.tau.item() == 0.0
    optimizer.zero_grad()
    (1e6 * layer.tau).backward()  # pushing further is blocked ...
    assert layer.tau_raw.grad.item() == 0.0
    optimizer.zero_grad()
    (-layer.tau).backward()  # ... pulling back up is not
    assert layer.tau_raw.grad.item() == -1.0
    before = layer.tau_raw.item()
    optimizer.step()
    assert layer.tau_raw.item() > before


def test_doran_generator_is_shared_within_a_block(source, pixels):
    doran = apply_doran(copy.deepcopy(source), 4, 1, targets=("q_proj", "v_proj"), tau_init=0.2)
    block = doran.model.layer[2]
    assert list(block.doran_generators) == ["in32_out32"]
    shared = block.doran_generators["in32_out32"]
    assert block.attention.q_proj.generator is shared and block.attention.v_proj.generator is shared
    a_q, b_q = block.attention.q_proj.factors()
    a_v, _ = block.attention.v_proj.factors()
    assert b_q.abs().max().item() == 0.0 and a_q.abs().max().item() > 0
    assert not torch.allclose(a_q, a_v)
    # tau_init > 0 keeps the output equal to the base at init (magnitude starts at ||W0|| + tau).
    assert (hidden(doran, pixels) - hidden(copy.deepcopy(source), pixels)).abs().max().item() <= 1e-5
    out = doran(pixel_values=pixels).last_hidden_state
    out.square().mean().backward()
    assert shared.net_b[-1].weight.grad.abs().sum().item() > 0
    state = doran.state_dict()
    assert any(k.startswith("model.layer.2.doran_generators.") for k in state)
    assert not any("q_proj._generator" in k for k in state)


def test_adapters_disabled_restores_base_output(source, pixels):
    for kind in ("dora", "doran"):
        adapted = ADAPTERS[kind](copy.deepcopy(source))
        perturb_adapters(adapted)
        with adapters_disabled(adapted):
            off = hidden(adapted, pixels)
        assert torch.equal(off, hidden(copy.deepcopy(source), pixels))
        assert not torch.equal(hidden(adapted, pixels), off)


def test_backbone_wrapper_is_adapted_in_place(tmp_path, pixels):
    small_model().save_pretrained(tmp_path / "src")
    backbone = DINOv3Backbone.load(tmp_path / "src")
    reference = backbone.extract(pixels).clone()
    fingerprint = backbone.fingerprint()
    for apply in (lambda b: apply_dora(b, 2, 1), lambda b: apply_doran(b, 2, 1)):
        adapted = apply(DINOv3Backbone.load(tmp_path / "src"))
        assert isinstance(adapted, DINOv3Backbone)
        assert adapted_module_names(adapted)
        torch.testing.assert_close(adapted.extract(pixels), reference, atol=1e-6, rtol=0)
        perturb_adapters(adapted.model)
        changed = adapted.extract(pixels)
        merged = merge_adapters(adapted)
        assert merged is adapted and not adapted_module_names(merged)
        torch.testing.assert_close(merged.extract(pixels), changed, atol=1e-5, rtol=0)
        assert merged.fingerprint() != fingerprint
        assert set(merged.model.state_dict()) == set(backbone.model.state_dict())


def test_verify_peft_flags_missing_modules_and_extra_trainables(source, pixels):
    base = copy.deepcopy(source)
    adapted = apply_lora(copy.deepcopy(source), 2, 1)
    figures = verify_peft(base, adapted, pixels, expected_modules=["model.layer.0.attention.q_proj"])
    assert figures["missing_modules"] == ["model.layer.0.attention.q_proj"] and not figures["passed"]
    adapted.base_model.model.norm.weight.requires_grad_(True)
    figures = verify_peft(base, adapted, pixels)
    assert figures["non_adapter_trainable"] == ["norm.weight"] and not figures["passed"]
