"""ExPLoRA pre-training on a small random DINOv3: trainable set, loss, resume, export, data guards."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from stage1_core.artifacts import load_tensors
from stage1_core.domain_adaptation import (
    ExPLoRAConfig,
    ExPLoRAError,
    ExPLoRATrainer,
    ForbiddenImageError,
    UnlabeledImageDataset,
    build_pretrain_eval_transform,
    build_pretrain_transform,
    patchify,
    plot_explora_losses,
    random_patch_mask,
    reconstruction_gain,
    split_held_out,
    unlabeled_images,
)
from stage1_core.model.backbone import DINOv3Backbone, fingerprint_model

SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    patch_size=16, num_register_tokens=2, image_size=32,
)
FAST = dict(batch_size=4, decoder_dim=32, decoder_heads=2, progress=False, lr=1e-3, decoder_lr=3e-3)


def small_model(seed: int = 0) -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    return DINOv3ViTModel(DINOv3ViTConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return small_model()


@pytest.fixture(scope="module")
def repetitive() -> torch.Tensor:
    """12 images made of 3 repeated random patterns (normalised-pixel scale)."""
    patterns = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return patterns.repeat(4, 1, 1, 1)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """12 small PNGs: smooth colour gradients with a stripe, so crops and flips matter."""
    directory = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(12):
        a, b, c = rng.uniform(0, 255, size=3)
        image = np.stack([(a + 3 * xx) % 255, (b + 3 * yy) % 255, np.full_like(xx, c, dtype=float)], -1)
        image[(xx + i) % 10 < 3] = 255
        path = directory / f"img_{i:02d}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_only_intended_parameters_train(source):
    flags = {n: p.requires_grad for n, p in source.named_parameters()}
    weights = {n: p.detach().clone() for n, p in source.named_parameters()}
    trainer = ExPLoRATrainer(source, ExPLoRAConfig(unfrozen_blocks=1, lora_r=4, **FAST))
    expected = {"embeddings.cls_token", "embeddings.register_tokens", "embeddings.mask_token", "norm.weight", "norm.bias"}
    expected |= {f"model.layer.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
    expected |= {f"model.layer.0.attention.{m}.lora_{f}.default.weight" for m in ("q_proj", "v_proj") for f in "AB"}
    expected |= {f"model.layer.1.{name}" for name, _ in source.model.layer[1].named_parameters()}
    assert set(trainer.trainable_names()) == expected
    assert not any("k_proj.lora" in n or "layer.0.mlp" in n for n in trainer.trainable_names())
    report = trainer.parameter_report()
    assert report["lora_blocks"] == [0] and report["unfrozen_blocks"] == [1]
    assert report["lora_parameters"] == 2 * 2 * 4 * SMALL["hidden_size"]
    assert 0 < report["backbone_fraction"] < 1
    # The caller's source model is not touched.
    assert flags == {n: p.requires_grad for n, p in source.named_parameters()}
    assert all(torch.equal(weights[n], p) for n, p in source.named_parameters())
    assert all(type(m) is nn.Linear for n, m in source.named_modules() if n.endswith("q_proj"))
    # The optimiser holds exactly the trainable backbone parameters plus the decoder.
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    wanted = {id(p) for p in trainer.encoder.parameters() if p.requires_grad} | {id(p) for p in trainer.decoder.parameters()}
    assert held == wanted


def test_all_blocks_unfrozen_means_no_lora(source):
    trainer = ExPLoRATrainer(source, ExPLoRAConfig(unfrozen_blocks=2, **FAST))
    assert trainer.lora_blocks == [] and not any("lora" in n for n in trainer.trainable_names())
    with pytest.raises(ValueError, match="unfrozen_blocks"):
        ExPLoRATrainer(source, ExPLoRAConfig(unfrozen_blocks=3, **FAST))


def test_loss_is_finite_and_decreases_on_a_repetitive_set(source, repetitive):
    trainer = ExPLoRATrainer(source, ExPLoRAConfig(epochs=6, **FAST))
    history = trainer.fit(TensorDataset(repetitive), held_out=repetitive[:4])
    losses = [e["train_loss"] for e in history["epochs"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    gain = reconstruction_gain(history, margin=0.05)
    assert gain["end"] < gain["start"] and gain["passed"], gain
    control = ExPLoRATrainer(source, ExPLoRAConfig(epochs=6, train_backbone=False, **FAST))
    assert control.trainable_names() == [] and control.lora_blocks == []
    control_history = control.fit(TensorDataset(repetitive), held_out=repetitive[:4])
    assert control_history["held_out_start"] == history["held_out_start"]
    versus = reconstruction_gain(history, margin=0.05, control=control_history)
    assert versus["relative_to_control"] > 0, versus
    assert versus["passed"] == (versus["relative_to_control"] > 0)
    assert fingerprint_model(control.merged_model(), source.config) == fingerprint_model(source, source.config)
    assert not reconstruction_gain({"held_out_start": 1.0, "held_out_end": 0.99}, margin=0.05)["passed"]


def test_held_out_loss_is_repeatable_and_leaves_modes_alone(source, repetitive):
    trainer = ExPLoRATrainer(source, ExPLoRAConfig(**FAST))
    trainer.model.train()
    first = trainer.held_out_loss(repetitive[:5])
    assert first == trainer.held_out_loss(TensorDataset(repetitive[:5]))
    assert trainer.model.training and trainer.decoder.training
    assert np.isfinite(first) and first > 0.5  # an untrained decoder cannot reconstruct normalised pixels


def test_patchify_order_and_mask_count():
    grid = torch.arange(4.0).reshape(1, 1, 2, 2)
    pixels = grid.repeat_interleave(16, dim=2).repeat_interleave(16, dim=3).repeat(1, 3, 1, 1)
    patches = patchify(pixels, 16)
    assert patches.shape == (1, 4, 16 * 16 * 3)
    assert torch.equal(patches[0, :, 0], torch.arange(4.0)) and bool((patches.std(dim=-1) == 0).all())
    mask = random_patch_mask(5, 196, 0.75, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == [147] * 5
    assert not torch.equal(mask[0], mask[1])


def state_of(trainer: ExPLoRATrainer) -> dict[str, torch.Tensor]:
    state = {f"backbone.{n}": p.detach().clone() for n, p in trainer.encoder.named_parameters() if p.requires_grad}
    state.update({f"decoder.{k}": v.detach().clone() for k, v in trainer.decoder.state_dict().items()})
    return state


def test_resume_after_one_epoch_equals_an_uninterrupted_run(source, image_files, tmp_path):
    dataset = UnlabeledImageDataset(image_files, transform=build_pretrain_transform(32))
    config = ExPLoRAConfig(epochs=2, **FAST)
    whole = ExPLoRATrainer(source, config)
    whole.fit(dataset)

    checkpoint = tmp_path / "explora_last.pt"
    first = ExPLoRATrainer(source, config)
    first.fit(dataset, checkpoint_path=checkpoint, stop_after=1)
    assert first.epoch == 1 and checkpoint.is_file()
    data = load_tensors(checkpoint)  # weights_only=True
    assert data["epoch"] == 1 and data["kind"] == "explora"
    resumed = ExPLoRATrainer(source, config)
    resumed.fit(dataset, checkpoint_path=checkpoint)
    assert resumed.epoch == 2 and resumed.global_step == whole.global_step == 6

    a, b = state_of(whole), state_of(resumed)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert [e["train_loss"] for e in whole.history["epochs"]] == pytest.approx(
        [e["train_loss"] for e in resumed.history["epochs"]], abs=1e-6)
    moved = max((a[k] - p).abs().max().item() for k, p in state_of(ExPLoRATrainer(source, config)).items())
    assert moved > 1e-4, "training must have changed the parameters for the comparison to mean anything"

    other_seed = ExPLoRATrainer(source, ExPLoRAConfig(epochs=2, **{**FAST, "lr": 5e-4}))
    with pytest.raises(ExPLoRAError, match="lr"):
        other_seed.load_checkpoint(checkpoint)
    with pytest.raises(ExPLoRAError, match="another source"):
        ExPLoRATrainer(small_model(seed=1), config).load_checkpoint(checkpoint)


def test_merge_and_save_round_trip(source, repetitive, tmp_path):
    trainer = ExPLoRATrainer(source, ExPLoRAConfig(epochs=2, **FAST))
    trainer.fit(TensorDataset(repetitive))
    pixels = repetitive[:3]
    trainer.model.eval()
    with torch.no_grad():
        unmerged = trainer.encoder(pixel_values=pixels).last_hidden_state[:, 0]
    merged = trainer.merged_model()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        in_memory = merged(pixel_values=pixels).last_hidden_state[:, 0]
    assert (in_memory - unmerged).abs().max().item() <= 1e-5

    out = trainer.merge_and_save(tmp_path / "adapted")
    assert (out / "model.safetensors").is_file() and (out / "explora.json").is_file()
    loaded = DINOv3Backbone.load(out)
    assert (loaded.extract(pixels) - in_memory).abs().max().item() <= 1e-5
    assert loaded.fingerprint() != fingerprint_model(source, source.config)
    assert loaded.fingerprint() == fingerprint_model(merged, merged.config)
    # Writing again replaces the directory cleanly.
    trainer.merge_and_save(out)
    assert DINOv3Backbone.load(out).fingerprint() == loaded.fingerprint()
    # Nothing left behind but the one version directory the name links to (a link flip).
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == [(tmp_path / "adapted").resolve()], hidden


def test_loss_figure_is_written(tmp_path):
    history = {"epochs": [{"epoch": 1, "train_loss": 1.2}, {"epoch": 2, "train_loss": 0.9}],
               "held_out_start": 1.3, "held_out_end": 0.95}
    path = plot_explora_losses(history, tmp_path / "explora_loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forbidden_validation_images_are_refused(image_files, tmp_path):
    train, val = image_files[:8], image_files[8:]
    assert unlabeled_images(train, forbidden=val) == [p.resolve() for p in train]
    with pytest.raises(ForbiddenImageError, match="1 image"):
        unlabeled_images(train + [val[0]], forbidden=val)
    # The same file through a symlink or a relative path is still caught.
    link = tmp_path / "alias.png"
    link.symlink_to(val[1])
    with pytest.raises(ForbiddenImageError):
        unlabeled_images(train + [link], forbidden=val)
    # extra_dir is scanned too, and an extra folder holding val images is refused.
    with pytest.raises(ForbiddenImageError, match="4 image"):
        unlabeled_images(train, extra_dir=val[0].parent, forbidden=val)
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(extra / "street.jpg")
    (extra / "notes.txt").write_text("not an image")
    paths = unlabeled_images(train + train[:2], extra_dir=extra, forbidden=val)
    assert paths == [p.resolve() for p in train] + [(extra / "street.jpg").resolve()]


def test_dataset_and_held_out_split(image_files):
    dataset = UnlabeledImageDataset(image_files[:3], image_size=32)
    assert dataset[0].shape == (3, 32, 32) and dataset[0].dtype == torch.float32
    fixed = UnlabeledImageDataset(image_files[:3], transform=build_pretrain_eval_transform(32))
    assert torch.equal(fixed[1], fixed[1])
    rest, held = split_held_out(image_files, 4, seed=0)
    assert len(held) == 4 and len(rest) == 8 and not set(rest) & set(held)
    assert split_held_out(image_files, 4, seed=0) == (rest, held)
    with pytest.raises(ValueError):
        split_held_out(image_files, 12)


def test_max_images_caps_the_pre_training_set(source, repetitive):
    trainer = ExPLoRATrainer(source, ExPLoRAConfig(epochs=1, max_images=5, **FAST))
    history = trainer.fit(TensorDataset(repetitive))
    assert history["epochs"][0]["images"] == 5 and trainer.global_step == 2


def test_invalid_settings_are_refused():
    for bad in ({"mask_ratio": 1.0}, {"epochs": 0}, {"decoder_dim": 30, "decoder_heads": 4}, {"lora_r": -1}):
        with pytest.raises(ValueError):
            ExPLoRAConfig(**bad)
    adapted = copy.deepcopy(small_model())
    from stage1_core.model.peft import apply_lora

    with pytest.raises(ValueError, match="adapters"):
        ExPLoRATrainer(apply_lora(adapted, 2, 1), ExPLoRAConfig(**FAST))


def test_missing_pre_training_image_is_reported(image_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="1 pre-training image"):
        unlabeled_images(image_files[:2] + [tmp_path / "gone.png"])


def test_gradient_checkpointing_recomputes_the_encoder_blocks_and_gives_the_same_losses(source, repetitive):
    from stage1_core.model.backbone import checkpointed_blocks

    plain = ExPLoRATrainer(source, ExPLoRAConfig(epochs=1, **FAST))
    checkpointed = ExPLoRATrainer(source, ExPLoRAConfig(epochs=1, gradient_checkpointing=True, **FAST))
    assert checkpointed_blocks(plain.model) == [] and len(checkpointed_blocks(checkpointed.model)) == SMALL["num_hidden_layers"]
    losses = [trainer.train_epoch(TensorDataset(repetitive)) for trainer in (plain, checkpointed)]
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), losses
