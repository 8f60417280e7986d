"""ExPLoRA: continued self-supervised pre-training of a DINOv3 backbone on unlabeled target images.

Recipe (Khanna et al., ICML 2025), as adapted here:

* the source ViT is frozen; every parameter of the last ``unfrozen_blocks`` blocks, every
  LayerNorm, the CLS / register tokens and the mask token train;
* the other blocks get LoRA of rank ``lora_r`` on ``q_proj`` and ``v_proj`` (peft);
* objective: masked-image modelling. ExPLoRA itself continues the *source model's own*
  objective (DINOv2's for DINOv2); this project uses an MAE-style pixel objective instead
  (METHODS section 7): ``mask_ratio`` of the patches are replaced by DINOv3's mask token through
  ``bool_masked_pos`` (the encoder sees every position, SimMIM-like), a light decoder trained
  from scratch maps the patch tokens to pixels, and the loss is the MSE on masked patches only
  against per-patch normalised pixels (MAE's ``norm_pix_loss``).

Determinism: every random choice of an epoch (data order, crops and flips, masks, DINOv3's RoPE
jitter in train mode) is drawn inside a forked RNG scope seeded from ``(seed, epoch)``, so an
epoch's outcome depends only on the seed, the epoch index and the state at its start. A
checkpoint written after each epoch therefore resumes to the same result as an uninterrupted
run; it holds plain tensors and values only (``torch.load(weights_only=True)``).

After pre-training, :meth:`ExPLoRATrainer.merge_and_save` folds the LoRA weights in and writes a
plain Hugging Face checkpoint that :meth:`DINOv3Backbone.load` reads like any other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from stage1_core.artifacts import ArtifactError, atomic_write_bytes, atomic_write_text, load_tensors, save_tensors
from stage1_core.distributed import ddp, env
from stage1_core.model.backbone import DINOv3Backbone, enable_gradient_checkpointing, fingerprint_model
from stage1_core.model.peft import adapter_kind, apply_lora, merge_adapters, num_blocks

FORMAT_VERSION = 1
LORA_TARGETS = ("q_proj", "v_proj")
METADATA_FILE = "explora.json"
#: Config fields that do not change the numbers (a checkpoint may be resumed with other values).
_RUNTIME_FIELDS = ("progress", "num_workers", "autocast")
#: Parameters kept out of weight decay besides biases and norm weights (1-d tensors).
_NO_DECAY = frozenset({"cls_token", "register_tokens", "mask_token", "pos"})

__all__ = [
    "ExPLoRAConfig",
    "ExPLoRAError",
    "ExPLoRATrainer",
    "PixelDecoder",
    "masked_patch_loss",
    "patchify",
    "plot_explora_losses",
    "random_patch_mask",
    "reconstruction_gain",
]


class ExPLoRAError(ArtifactError):
    """An ExPLoRA checkpoint cannot be used (unreadable, other source model or other settings)."""


@dataclass(frozen=True)
class ExPLoRAConfig:
    """Settings of one ExPLoRA pre-training run.

    ``lr`` applies to the backbone (LoRA, unfrozen block, norms, tokens), ``decoder_lr`` to the
    decoder, which starts from scratch and needs a larger step. The learning rate warms up
    linearly over ``warmup_fraction`` of the steps, then follows a cosine to 0. ``max_images``
    caps the pre-training set (a fixed random subset); ``held_out_images`` is how many train
    images the caller should keep aside for :meth:`ExPLoRATrainer.held_out_loss`.
    ``train_backbone=False`` trains the decoder alone on the frozen source (no LoRA, nothing
    unfrozen): the control run that tells how much of the held-out gain the backbone adaptation
    bought, since a decoder trained from scratch lowers the loss by itself.
    """

    unfrozen_blocks: int = 1
    lora_r: int = 8
    lora_alpha: float | None = None
    mask_ratio: float = 0.75
    epochs: int = 2
    lr: float = 2e-4
    decoder_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    batch_size: int = 32
    decoder_dim: int = 128
    decoder_depth: int = 1
    decoder_heads: int = 4
    seed: int = 0
    max_images: int | None = None
    held_out_images: int = 32
    grad_clip: float | None = 1.0
    num_workers: int = 0
    progress: bool = True
    autocast: bool = True
    train_backbone: bool = True
    #: Recompute the encoder blocks' activations in backward (Hugging Face activation
    #: checkpointing): less memory, about one more forward pass per step, same results.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = {
            "unfrozen_blocks": self.unfrozen_blocks >= 0,
            "lora_r": self.lora_r >= 0,
            "mask_ratio": 0.0 < self.mask_ratio < 1.0,
            "epochs": self.epochs >= 1,
            "lr": self.lr > 0,
            "decoder_lr": self.decoder_lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_fraction": 0.0 <= self.warmup_fraction < 1.0,
            "batch_size": self.batch_size >= 1,
            "decoder_dim": self.decoder_dim >= 1 and self.decoder_dim % self.decoder_heads == 0,
            "decoder_depth": self.decoder_depth >= 0,
            "decoder_heads": self.decoder_heads >= 1,
            "max_images": self.max_images is None or self.max_images >= 1,
            "held_out_images": self.held_out_images >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "num_workers": self.num_workers >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid ExPLoRA settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p*p*C]`` in DINOv3's patch order (row-major over the patch grid)."""
    b, c, h, w = pixels.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def random_patch_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean ``[B, N]`` mask with exactly ``round(ratio * N)`` (at least 1, at most N-1) True per row."""
    count = min(max(int(round(ratio * num_patches)), 1), num_patches - 1)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    return mask


def masked_patch_loss(prediction: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-patch MSE over masked patches against per-patch normalised pixels, and the count.

    The target of each patch is standardised by its own mean and variance (MAE's normalised-pixel
    target), so the loss of a constant prediction is about 1 and a low loss means structure is
    predicted, not brightness. Returns ``(sum, number of masked patches)``.
    """
    target = target_patches.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=False)
    target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = (prediction.float() - target).square().mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum(), weights.sum()


class _DecoderBlock(nn.Module):
    """Pre-norm transformer block (self-attention + MLP) at the decoder width."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class PixelDecoder(nn.Module):
    """Patch tokens ``[B, N, hidden]`` -> pixels ``[B, N, p*p*C]``.

    Linear projection to ``dim`` plus a learned position embedding, ``depth`` narrow transformer
    blocks (``depth = 0`` gives a per-token MLP), LayerNorm and a linear pixel head.
    """

    def __init__(self, hidden_size: int, num_patches: int, patch_pixels: int, dim: int = 128, depth: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.embed = nn.Linear(hidden_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_DecoderBlock(dim, heads) for _ in range(depth))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim), nn.GELU()) if depth == 0 else nn.Identity()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_pixels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.num_patches:
            raise ValueError(f"decoder built for {self.num_patches} patches, got {tokens.shape[1]}: use the model's image_size")
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(self.mlp(x)))


def _derive_seed(seed: int, *parts: Any) -> int:
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % (2**63 - 1)


def _square(value: Any, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the CPU (and current CUDA device) RNG and seed it; the caller's RNG state is restored on exit."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ExPLoRATrainer:
    """Continued masked-image pre-training of a DINOv3 model (see the module docstring).

    ``backbone_model`` is a ``DINOv3ViTModel`` or a :class:`DINOv3Backbone`; it is deep-copied,
    so the caller's source model is left untouched. Use :meth:`fit` (with a held-out set and a
    checkpoint path), then :meth:`merge_and_save`.
    """

    def __init__(self, backbone_model: nn.Module, config: ExPLoRAConfig | None = None, device: str | torch.device | None = None) -> None:
        self.config = config = config or ExPLoRAConfig()
        source = backbone_model.model if isinstance(backbone_model, DINOv3Backbone) else backbone_model
        if adapter_kind(source) != "none":
            raise ValueError("the source model already carries adapters: merge them before ExPLoRA")
        self.device = torch.device(device) if device is not None else next(source.parameters()).device
        self.source_fingerprint = fingerprint_model(source, source.config)
        hf_config = source.config
        self.patch_size = _square(hf_config.patch_size, "patch size")
        self.image_size = _square(hf_config.image_size, "image size")
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_prefix_tokens = 1 + int(getattr(hf_config, "num_register_tokens", 0) or 0)
        total_blocks = num_blocks(source)
        if config.unfrozen_blocks > total_blocks:
            raise ValueError(f"unfrozen_blocks={config.unfrozen_blocks} but the model has {total_blocks} blocks")
        adapt = config.train_backbone
        self.unfrozen_blocks = list(range(total_blocks - config.unfrozen_blocks, total_blocks)) if adapt else []
        self.lora_blocks = list(range(total_blocks - config.unfrozen_blocks)) if adapt and config.lora_r > 0 else []

        with _seeded(_derive_seed(config.seed, "init"), self.device):
            model = copy.deepcopy(source).to(self.device)
            for param in model.parameters():
                param.requires_grad_(False)
            if self.lora_blocks:
                model = apply_lora(model, config.lora_r, self.lora_blocks, alpha=config.lora_alpha, targets=LORA_TARGETS)
        # Seeded on its own, so the decoder starts the same whatever the backbone set-up (control runs).
        with _seeded(_derive_seed(config.seed, "decoder"), self.device):
            channels = int(getattr(hf_config, "num_channels", 3))
            self.decoder = PixelDecoder(
                int(hf_config.hidden_size), self.num_patches, self.patch_size**2 * channels,
                dim=config.decoder_dim, depth=config.decoder_depth, heads=config.decoder_heads,
            ).to(self.device)
        self.model = model
        self._unfreeze()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=(0.9, 0.95))
        self.epoch = 0
        self.global_step = 0
        self.steps_per_epoch: int | None = None
        self.history: dict[str, Any] = {"epochs": [], "held_out_start": None, "held_out_end": None}

    @property
    def encoder(self) -> nn.Module:
        """The Hugging Face model (LoRA layers, if any, injected in it)."""
        return self.model.base_model.model if self.lora_blocks else self.model

    def _unfreeze(self) -> None:
        if not self.config.train_backbone:
            return
        encoder = self.encoder
        for index in self.unfrozen_blocks:
            encoder.model.layer[index].requires_grad_(True)
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
        embeddings = encoder.embeddings
        for name in ("cls_token", "register_tokens", "mask_token"):
            param = getattr(embeddings, name, None)
            if isinstance(param, nn.Parameter) and param.numel():
                param.requires_grad_(True)

    def trainable_names(self) -> list[str]:
        """Names (relative to the Hugging Face model) of the backbone parameters that train."""
        return sorted(name for name, p in self.encoder.named_parameters() if p.requires_grad)

    def _param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        named = [("backbone", n, p) for n, p in sorted(self.encoder.named_parameters())]
        named += [("decoder", n, p) for n, p in self.decoder.named_parameters()]
        for part, name, param in named:
            if param.requires_grad:
                decay = param.ndim >= 2 and name.rsplit(".", 1)[-1] not in _NO_DECAY
                groups.setdefault((part, decay), []).append(param)
        return [
            {"params": params, "lr": cfg.lr if part == "backbone" else cfg.decoder_lr,
             "base_lr": cfg.lr if part == "backbone" else cfg.decoder_lr,
             "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}"}
            for (part, decay), params in groups.items()
        ]

    def parameter_report(self) -> dict[str, Any]:
        """Trainable / total backbone parameters, LoRA and unfrozen blocks, decoder size."""
        total = sum(p.numel() for p in self.encoder.parameters())
        trainable = sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
        lora = sum(p.numel() for n, p in self.encoder.named_parameters() if "lora_" in n)
        return {
            "backbone_trainable": int(trainable),
            "backbone_total": int(total),
            "backbone_fraction": trainable / total,
            "lora_parameters": int(lora),
            "lora_blocks": list(self.lora_blocks),
            "unfrozen_blocks": list(self.unfrozen_blocks),
            "decoder_parameters": int(sum(p.numel() for p in self.decoder.parameters())),
        }

    def _autocast(self) -> Any:
        enabled = self.config.autocast and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _loss_terms(
        self, pixels: torch.Tensor, mask: torch.Tensor, reconstruct: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixels.to(self.device, non_blocking=True)
        mask = mask.to(self.device)
        with self._autocast():
            prediction = (reconstruct or _Reconstruction(self))(pixels, mask)
        return masked_patch_loss(prediction, patchify(pixels, self.patch_size), mask)

    def _lr_factor(self, step: int) -> float:
        total = self.config.epochs * (self.steps_per_epoch or 1)
        warmup = int(round(self.config.warmup_fraction * total))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def _trainable(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _limit(self, dataset: Dataset) -> Dataset:
        cap = self.config.max_images
        if cap is None or len(dataset) <= cap:
            return dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(_derive_seed(self.config.seed, "subset")))
        return Subset(dataset, sorted(order[:cap].tolist()))

    def train_epoch(self, dataset: Dataset) -> float:
        """One pass over ``dataset`` (tensors ``[3, H, W]``); returns the mean masked-patch loss.

        In a ``torch.distributed`` job ``batch_size`` is the global batch: every rank draws the
        batches and masks one process would and takes its slice (:mod:`stage1_core.distributed.ddp`);
        the loss is the global masked-patch sum over the global count, so the step equals one
        process's. A last global batch smaller than the number of ranks is skipped.
        """
        cfg = self.config
        self.steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
        start = time.perf_counter()
        loss_sum = count_sum = 0.0
        world, reconstruct = env.world_size(), None
        # Augmentations draw from the global RNG: each rank its own stream, a function of seed and epoch.
        epoch_seed = _derive_seed(cfg.seed, "epoch", self.epoch, *(("rank", env.rank()) if env.rank() else ()))
        with _seeded(epoch_seed, self.device):
            order = torch.Generator().manual_seed(_derive_seed(cfg.seed, "order", self.epoch))
            if env.active():
                reconstruct = ddp.wrap(_Reconstruction(self), self.device)
                sampler = ddp.RankSlicedBatchSampler(len(dataset), cfg.batch_size, order, drop_last=False)
                loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, generator=order,
                                    pin_memory=self.device.type == "cuda")
            else:
                loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                    generator=order, pin_memory=self.device.type == "cuda")
            masks = torch.Generator().manual_seed(_derive_seed(cfg.seed, "mask", self.epoch))
            self.model.train()
            self.decoder.train()
            bar = tqdm(loader, desc=f"ExPLoRA {self.epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
            for index, pixels in enumerate(bar):
                pixels = pixels[0] if isinstance(pixels, (tuple, list)) else pixels
                rows = min(cfg.batch_size, len(dataset) - index * cfg.batch_size)  # the global batch's size
                mask = random_patch_mask(rows, self.num_patches, cfg.mask_ratio, masks)[env.rank_slice(rows)]
                factor = self._lr_factor(self.global_step)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                total, count = self._loss_terms(pixels, mask, reconstruct)
                loss = total / count
                if reconstruct is not None:
                    # DDP averages gradients over the ranks: scale so the step is d(global sum / global count).
                    global_total, global_count = env.all_reduce_sum([float(total.detach()), float(count)])
                    loss = total * world / global_count
                    total, count = torch.tensor(global_total), torch.tensor(global_count)
                if not torch.isfinite(total / count):
                    raise FloatingPointError(f"ExPLoRA loss is {loss.item()} at step {self.global_step}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self._trainable(), cfg.grad_clip)
                self.optimizer.step()
                self.global_step += 1
                loss_sum += float(total.detach())
                count_sum += float(count)
                bar.set_postfix(loss=f"{float(total.detach()) / float(count):.4f}")
        self.model.eval()
        self.epoch += 1
        mean_loss = loss_sum / max(count_sum, 1.0)
        self.history["epochs"].append({
            "epoch": self.epoch,
            "train_loss": mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images": len(dataset),
            "seconds": time.perf_counter() - start,
        })
        return mean_loss

    @torch.no_grad()
    def held_out_loss(self, images: torch.Tensor | Dataset) -> float:
        """Masked-patch loss in eval mode on ``images`` with fixed masks (same masks every call).

        ``images`` is a ``[N, 3, H, W]`` tensor or a dataset of such tensors (use a deterministic
        transform); comparing the value before and after :meth:`fit` measures what pre-training
        bought on images it did not train on.
        """
        dataset = TensorDataset(images) if isinstance(images, torch.Tensor) else images
        if len(dataset) == 0:
            raise ValueError("held_out_loss needs at least one image")
        loader = DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False, num_workers=self.config.num_workers)
        masks = torch.Generator().manual_seed(_derive_seed(self.config.seed, "held_out"))
        modes = (self.model.training, self.decoder.training)
        self.model.eval()
        self.decoder.eval()
        total = count = 0.0
        try:
            for pixels in loader:
                pixels = pixels[0] if isinstance(pixels, (tuple, list)) else pixels
                mask = random_patch_mask(pixels.shape[0], self.num_patches, self.config.mask_ratio, masks)
                batch_total, batch_count = self._loss_terms(pixels, mask)
                total += float(batch_total)
                count += float(batch_count)
        finally:
            self.model.train(modes[0])
            self.decoder.train(modes[1])
        return total / count

    def fit(
        self,
        dataset: Dataset,
        held_out: torch.Tensor | Dataset | None = None,
        checkpoint_path: str | Path | None = None,
        stop_after: int | None = None,
    ) -> dict[str, Any]:
        """Pre-train until ``config.epochs`` epochs are done; return the history.

        With ``checkpoint_path``, an existing checkpoint there is resumed first and a new one is
        written after every epoch. ``held_out`` (if given) is evaluated before the first epoch
        (``held_out_start``) and after the last one (``held_out_end``). ``stop_after`` ends the
        call once that many epochs are done (an interruption; a later call resumes).
        """
        if checkpoint_path is not None and Path(checkpoint_path).is_file():
            self.load_checkpoint(checkpoint_path)
        dataset = self._limit(dataset)
        if len(dataset) == 0:
            raise ValueError("ExPLoRA needs at least one pre-training image")
        if held_out is not None and self.history["held_out_start"] is None and self.epoch == 0:
            self.history["held_out_start"] = self.held_out_loss(held_out)
        while self.epoch < self.config.epochs and (stop_after is None or self.epoch < stop_after):
            self.train_epoch(dataset)
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
        if held_out is not None and self.epoch >= self.config.epochs and self.history["held_out_end"] is None:
            self.history["held_out_end"] = self.held_out_loss(held_out)
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
        return self.history

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values."""
        trainable = {n: p.detach().to("cpu").clone() for n, p in self.encoder.named_parameters() if p.requires_grad}
        return {
            "format_version": FORMAT_VERSION,
            "kind": "explora",
            "config": self.config.to_dict(),
            "source_fingerprint": self.source_fingerprint,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "backbone_trainable": trainable,
            "decoder": {k: v.detach().to("cpu").clone() for k, v in self.decoder.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "history": copy.deepcopy(self.history),
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` atomically with ``torch.save`` (rank 0 of a distributed job).

        Every random draw of an epoch derives from the seed, the epoch and the rank, so the
        checkpoint taken at an epoch's end is all any rank needs to resume exactly.
        """
        if env.is_main():
            save_tensors(path, self.state_dict())
        env.barrier()
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from ``path`` (loaded with ``weights_only=True``); refuses another source or settings."""
        data = load_tensors(path, error=ExPLoRAError)
        if not isinstance(data, dict) or data.get("kind") != "explora":
            raise ExPLoRAError(f"{path}: not an ExPLoRA checkpoint")
        if data.get("source_fingerprint") != self.source_fingerprint:
            raise ExPLoRAError(f"{path}: written for another source backbone (fingerprint differs) - delete it to start over")
        mine = {k: v for k, v in self.config.to_dict().items() if k not in _RUNTIME_FIELDS}
        theirs = {k: v for k, v in dict(data.get("config", {})).items() if k not in _RUNTIME_FIELDS}
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ExPLoRAError(f"{path}: written with other ExPLoRA settings ({', '.join(changed)}) - delete it to start over")
        params = dict(self.encoder.named_parameters())
        saved = data["backbone_trainable"]
        if set(saved) != {n for n, p in params.items() if p.requires_grad}:
            raise ExPLoRAError(f"{path}: trainable parameters do not match this trainer")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        self.decoder.load_state_dict(data["decoder"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.epoch = int(data["epoch"])
        self.global_step = int(data["global_step"])
        self.steps_per_epoch = data["steps_per_epoch"]
        self.history = copy.deepcopy(data["history"])

    def merged_model(self) -> nn.Module:
        """A copy of the adapted backbone with LoRA folded in: a plain Hugging Face model in eval mode."""
        merged = copy.deepcopy(self.model)
        merged = merge_adapters(merged) if self.lora_blocks else merged
        merged.requires_grad_(False)
        return merged.eval()

    def merge_and_save(self, out_dir: str | Path) -> Path:
        """Save the merged backbone in Hugging Face format (safetensors) plus ``explora.json``.

        The directory is staged next to its final place and swapped in atomically
        (:func:`stage1_core.dirswap.replace_dir`), replacing an older one; :meth:`DINOv3Backbone.load` (``AutoModel.from_pretrained(local_files_only=True)``)
        reads it.
        """
        from stage1_core.dirswap import replace_dir, staging_dir

        out_dir = Path(out_dir)
        if not env.is_main():  # rank 0 writes; the others wait until the directory is in place
            env.barrier()
            return out_dir
        merged = self.merged_model()
        tmp = staging_dir(out_dir)
        try:
            merged.save_pretrained(tmp, safe_serialization=True)
            metadata = {
                "method": "explora",
                "objective": "masked patches (bool_masked_pos) -> normalised pixels, MSE on masked patches",
                "config": self.config.to_dict(),
                "source_fingerprint": self.source_fingerprint,
                "adapted_fingerprint": fingerprint_model(merged, merged.config),
                "epochs_done": self.epoch,
                "history": self.history,
                "parameters": self.parameter_report(),
            }
            atomic_write_text(tmp / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
            tmp.chmod(0o755)
            replace_dir(tmp, out_dir)  # staged, fsynced, one atomic link flip: never an empty name
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        env.barrier()
        return out_dir


class _Reconstruction(nn.Module):
    """Encoder (with its masked patches) and pixel decoder as one module, so DDP can wrap them together."""

    def __init__(self, trainer: "ExPLoRATrainer") -> None:
        super().__init__()
        self.model, self.decoder = trainer.model, trainer.decoder
        self._encoder = trainer.encoder
        self.num_prefix_tokens = trainer.num_prefix_tokens

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self._encoder(pixel_values=pixels, bool_masked_pos=mask)
        return self.decoder(out.last_hidden_state[:, self.num_prefix_tokens:])


def reconstruction_gain(
    history: Mapping[str, Any], margin: float = 0.05, control: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Held-out loss at start and end, the relative reduction, and whether it reaches ``margin``.

    With ``control`` (the history of a ``train_backbone=False`` run with the same settings and
    data), ``relative_to_control`` is ``(control_end - end) / control_end``: the part of the
    reduction due to adapting the backbone rather than to training the decoder. ``passed`` then
    requires both the reduction from the start and a positive gain over the control.
    """
    start, end = history.get("held_out_start"), history.get("held_out_end")
    figures: dict[str, Any] = {
        "start": start, "end": end, "reduction": None, "relative_reduction": None,
        "margin": float(margin), "passed": False,
    }
    if start is None or end is None:
        return figures
    relative = (start - end) / start if start > 0 else 0.0
    figures.update(start=float(start), end=float(end), reduction=float(start - end), relative_reduction=float(relative))
    passed = relative >= margin
    if control is not None:
        control_end = control.get("held_out_end")
        if control_end is None:
            raise ValueError("the control history has no held_out_end: run it with a held-out set to the end")
        gain = (control_end - end) / control_end if control_end > 0 else 0.0
        figures.update(control_end=float(control_end), relative_to_control=float(gain))
        passed = passed and gain > 0
    figures["passed"] = bool(passed)
    return figures


def plot_explora_losses(history: Mapping[str, Any], path: str | Path) -> Path:
    """PNG of the per-epoch training loss with the held-out loss at start and end (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs: Iterable[Mapping[str, Any]] = history.get("epochs", [])
    xs = [int(e["epoch"]) for e in epochs]
    ys = [float(e["train_loss"]) for e in history.get("epochs", [])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", label="train (masked patches)")
    start, end = history.get("held_out_start"), history.get("held_out_end")
    if start is not None:
        ax.scatter([0], [start], color="tab:red", zorder=3, label="held-out, start")
    if end is not None:
        ax.scatter([xs[-1] if xs else 0], [end], color="tab:green", zorder=3, label="held-out, end")
    gain = reconstruction_gain(history)
    title = "ExPLoRA reconstruction loss"
    if gain["relative_reduction"] is not None:
        title += f" (held-out -{100 * gain['relative_reduction']:.1f}%)"
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE on normalised pixels")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
