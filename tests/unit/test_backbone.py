"""DINOv3 backbone: builtin tiny backbone, local-only loading, CLS features, fingerprint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from stage1_core.artifacts import sha256_file
from stage1_core.model import backbone as backbone_module
from stage1_core.model.backbone import (
    TINY_DINOV3_CONFIG,
    BackboneError,
    DINOv3Backbone,
    ensure_builtin_backbone,
    resolve_backbone,
)

#: A very small DINOv3 for fast tests (32x32 images, 4 patches + 1 CLS + 4 registers).
SMALL_CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    patch_size=16, num_register_tokens=4, image_size=32,
)


def save_small_backbone(directory: Path, seed: int = 0) -> Path:
    """Write a small random DINOv3 in Hugging Face format to ``directory`` and return it."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    DINOv3ViTModel(DINOv3ViTConfig(**SMALL_CONFIG)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    return save_small_backbone(tmp_path_factory.mktemp("small_backbone"))


def test_builtin_backbone_is_written_once_with_deterministic_bytes(tmp_path):
    first = resolve_backbone("builtin:tiny-dinov3", tmp_path / "a")
    assert first == tmp_path / "a" / "backbones" / "tiny-dinov3"
    config = json.loads((first / "config.json").read_text())
    for key, value in TINY_DINOV3_CONFIG.items():
        assert config[key] == value
    assert config["model_type"] == "dinov3_vit"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    assert resolve_backbone("builtin:tiny-dinov3", tmp_path / "a") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp, "second resolve must not rebuild"
    second = ensure_builtin_backbone("tiny-dinov3", tmp_path / "b")
    assert sha256_file(first / "model.safetensors") == sha256_file(second / "model.safetensors")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    a = DINOv3Backbone.load(first)
    b = DINOv3Backbone.load("builtin:tiny-dinov3", artifacts_root=tmp_path / "b")
    assert a.hidden_size == 192 and a.fingerprint() == b.fingerprint()


def test_builtin_build_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_builtin_backbone("tiny-dinov3", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_builtin_and_incomplete_directory_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="unknown builtin backbone"):
        resolve_backbone("builtin:huge-dinov3", tmp_path)
    (tmp_path / "backbones" / "tiny-dinov3").mkdir(parents=True)
    with pytest.raises(BackboneError, match="not a complete model directory"):
        resolve_backbone("builtin:tiny-dinov3", tmp_path)


def test_hub_id_fails_at_once_without_touching_transformers(monkeypatch, tmp_path):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called for a hub id")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", forbidden)
    monkeypatch.chdir(tmp_path)
    hub_id = "facebook/dinov3-vits16-pretrain-lvd1689m"
    with pytest.raises(BackboneError) as info:
        DINOv3Backbone.load(hub_id)
    message = str(info.value)
    assert f"huggingface-cli download {hub_id} --local-dir" in message
    assert "set model_path to that directory" in message and "never downloads" in message


def test_directory_without_config_or_weights_is_refused(tmp_path, small_dir):
    with pytest.raises(BackboneError, match="no config.json"):
        resolve_backbone(str(tmp_path), tmp_path)
    (tmp_path / "config.json").write_text((small_dir / "config.json").read_text())
    with pytest.raises(BackboneError, match="no weights"):
        resolve_backbone(str(tmp_path), tmp_path)
    with pytest.raises(BackboneError, match="not a local model directory"):
        resolve_backbone(str(tmp_path / "missing"), tmp_path)


def test_load_is_local_only_and_frozen(monkeypatch, small_dir):
    import transformers

    calls = []
    original = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    backbone = DINOv3Backbone.load(small_dir)
    assert calls and calls[0]["local_files_only"] is True
    expected = sum(p.numel() for p in backbone.model.parameters())
    assert backbone.frozen_parameters == expected > 0
    assert backbone.trainable_parameters() == []
    assert backbone.hidden_size == 32


def test_extract_is_the_eval_mode_cls_token(small_dir):
    backbone = DINOv3Backbone.load(small_dir)
    images = torch.randn(3, 3, 32, 32)
    backbone.model.train()  # in train mode DINOv3 jitters RoPE; extract must switch to eval
    first = backbone.extract(images)
    second = backbone.extract(images)
    assert first.shape == (3, 32) and torch.equal(first, second)
    assert not first.requires_grad and backbone.forward_passes == 2
    with torch.no_grad():
        reference = backbone.model(pixel_values=images).last_hidden_state[:, 0]
    assert torch.equal(first, reference)


def test_fingerprint_tracks_weights_not_provenance(small_dir):
    backbone = DINOv3Backbone.load(small_dir)
    before = backbone.fingerprint()
    backbone.model.config.transformers_version = "0.0.0"
    assert backbone.fingerprint(refresh=True) == before
    with torch.no_grad():
        next(backbone.model.parameters()).add_(1e-3)
    assert backbone.fingerprint(refresh=True) != before
    assert backbone_module.fingerprint_model(backbone.model, backbone.config) == backbone.fingerprint()


def _saved_bytes_and_grads(backbone: DINOv3Backbone, pixels: torch.Tensor) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """Bytes of the tensors autograd keeps for backward during one forward, the features, the adapter grads."""
    from stage1_core.model.backbone import eval_keeping_checkpointing

    kept: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    eval_keeping_checkpointing(backbone.model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = backbone(pixels)
    features.pow(2).sum().backward()
    grads = [p.grad.clone() for p in backbone.trainable_parameters()]
    backbone.model.zero_grad(set_to_none=True)
    return sum(kept), features.detach(), grads


def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_gradients(small_dir):
    from stage1_core.model.backbone import checkpointed_blocks, enable_gradient_checkpointing
    from stage1_core.model.peft import apply_lora

    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = apply_lora(DINOv3Backbone.load(small_dir), 2, 2)
    checkpointed = apply_lora(DINOv3Backbone.load(small_dir), 2, 2)
    checkpointed.model.load_state_dict(plain.model.state_dict())
    assert checkpointed_blocks(checkpointed) == []
    assert enable_gradient_checkpointing(checkpointed) == SMALL_CONFIG["num_hidden_layers"]
    bytes_plain, features_plain, grads_plain = _saved_bytes_and_grads(plain, pixels)
    bytes_ckpt, features_ckpt, grads_ckpt = _saved_bytes_and_grads(checkpointed, pixels)
    # Only the blocks' inputs are kept; their activations are recomputed in backward.
    print(f"saved for backward: {bytes_plain} B plain, {bytes_ckpt} B checkpointed")
    assert bytes_ckpt < 0.5 * bytes_plain, (bytes_ckpt, bytes_plain)
    assert torch.allclose(features_ckpt, features_plain, atol=1e-6)
    assert len(grads_ckpt) == len(grads_plain) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_ckpt, grads_plain))
    # The blocks' children stay in eval mode: no dropout, no RoPE jitter.
    assert all(b.training for b in checkpointed_blocks(checkpointed))
    assert not any(m.training for b in checkpointed_blocks(checkpointed) for m in b.modules() if m is not b)
