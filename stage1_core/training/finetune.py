"""Fine-tuning the backbone with PEFT adapters together with the heads, on images (phases 4-5).

Recipe (LP-FT, Kumar et al., ICLR 2022): the heads are first trained on cached features of the
phase's backbone (the linear-probe stage, the caller's ordinary cached training), then adapters
on the last ``peft_blocks`` blocks (``peft_type``: LoRA, DoRA or DoRAN, :mod:`stage1_core.model.peft`)
and the heads train together on augmented images for ``finetune_epochs`` epochs, starting from
that head. Starting the adapters from an untrained head would let its random gradients disturb
the backbone first; starting from the probe's head they only move what helps. The start itself
(probe head, adapters at their identity initialisation) is evaluated on val_select as epoch 0 and
is a selection candidate like every epoch: when no fine-tuning epoch beats it, the phase keeps the
probe on the adapted backbone, and the training log says so.

Everything else is :func:`stage1_core.training.trainer.train_head` (same loss, schedule, EMA -
over adapters and heads - gradient clipping, AMP/TF32 on CUDA, SAM/F-SAM, exact resume);
selection is on val_select only. The result is the best epoch's head (``model_best.pth``) and
its adapters merged into a plain Hugging Face backbone saved next to it (safetensors), with the
figures the phase-4 gate judges: the PEFT checks at initialisation and after training, the
trainable fraction, the batch size and whether the out-of-memory fallback was needed, and the
peak memory.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stage1_core.distributed import ddp, env
from stage1_core.training.trainer import TrainResult, resolve_device, train_head

FINETUNED_DIR = "backbone"


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced."""

    train: TrainResult
    peft_init: dict[str, Any]
    peft_final: dict[str, Any]
    backbone_dir: Path | None
    fingerprint: str | None
    batch_size: int
    oom_fallback: bool
    images_per_epoch: int
    #: Transformer blocks whose activations were recomputed in backward (``gradient_checkpointing``).
    checkpointed_blocks: int = 0


def apply_peft(backbone: Any, cfg: Any) -> Any:
    """Put the configured adapters on the last ``peft_blocks`` blocks of ``backbone`` (in place)."""
    from stage1_core.model.peft import apply_dora, apply_doran, apply_lora

    kind = cfg.peft_type
    if kind == "none":
        raise ValueError("this phase fine-tunes backbone adapters: set peft_type to lora, dora or doran")
    builders: dict[str, Callable[..., Any]] = {"lora": apply_lora, "dora": apply_dora, "doran": apply_doran}
    return builders[kind](backbone, int(cfg.peft_r), int(cfg.peft_blocks))


def _subset(samples: Sequence[Any], cap: int | None, seed: int) -> list[Any]:
    if cap is None or len(samples) <= cap:
        return list(samples)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [samples[i] for i in sorted(order[:cap])]


def _sample_batch(samples: Sequence[Any], n: int = 4) -> torch.Tensor:
    from stage1_core.data.datasets import LabelledImageDataset

    dataset = LabelledImageDataset(list(samples[:n]))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _save_merged(model: torch.nn.Module, out_dir: Path) -> Path:
    """Save a merged Hugging Face model to ``out_dir`` atomically (staged, fsynced, one link flip).

    ``out_dir`` is never empty or partial, a kill at any point included (:mod:`stage1_core.dirswap`).
    """
    from stage1_core.dirswap import replace_dir, staging_dir

    tmp = staging_dir(out_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.chmod(0o755)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def finetune(
    cfg: Any,
    backbone_dir: str | Path,
    train_samples: Sequence[Any],
    val_select_samples: Sequence[Any],
    out_dir: str | Path,
    *,
    init_head_state: Any,
    loss_fn: Any = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    deployment: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Train adapters + gated heads on images; save the best head and the merged backbone in ``out_dir``.

    ``cfg`` is the phase config (``finetune_epochs`` replaces ``epochs``, the heads train at
    ``lr_head * finetune_head_lr_scale``, the adapters at ``lr_backbone``; ``finetune_max_images``
    caps the training images per run, a fixed seeded subset). ``val_select_samples`` are
    evaluated every epoch with the deterministic evaluation transform. ``deployment``
    (``{"seed", "train_views", "sha256": {sample id: content hash}}``, deployment pipeline on):
    training images show their clean view or one of ``train_views`` challenge views, drawn on the
    fly, and val_select its recorded challenge draw.
    """
    from stage1_core.data.datasets import LabelledImageDataset
    from stage1_core.data.loaders import make_dataloader, pick_batch_size
    from stage1_core.model.backbone import DINOv3Backbone
    from stage1_core.model.peft import merge_adapters, verify_peft
    from stage1_core.training.checkpoints import load_state_dict_file

    out = Path(out_dir)
    device = resolve_device(device)
    base = DINOv3Backbone.load(backbone_dir, device=device)
    reference = copy.deepcopy(base.model)
    backbone = apply_peft(base, cfg)
    sample = _sample_batch(val_select_samples if len(val_select_samples) else train_samples)
    peft_init = verify_peft(reference, backbone.model, sample)
    if cfg.gradient_checkpointing:  # before the batch-size probe, so the probe sees the smaller peak
        from stage1_core.model.backbone import enable_gradient_checkpointing, eval_keeping_checkpointing

        checkpointed = enable_gradient_checkpointing(backbone)
        eval_keeping_checkpointing(backbone.model)
    else:
        checkpointed = 0
    epochs = int(cfg.finetune_epochs)
    ft_cfg = cfg.with_updates(epochs=epochs, warmup_epochs=min(int(cfg.warmup_epochs), epochs - 1),
                              lr_head=float(cfg.lr_head) * float(cfg.finetune_head_lr_scale))

    chosen = _subset(train_samples, cfg.finetune_max_images, int(cfg.seed))
    train_set = LabelledImageDataset(chosen, augment=True, augmentation=cfg.augmentation)
    val_set = LabelledImageDataset(list(val_select_samples))
    if deployment is not None:
        from stage1_core.data.challenge_views import ChallengeViewDataset, MixedViewDataset

        sha = deployment["sha256"]
        train_set = MixedViewDataset(chosen, [sha[s.sample_id] for s in chosen], deployment["seed"],
                                     deployment["train_views"], train_set.transform)
        val_set = ChallengeViewDataset(list(val_select_samples), [sha[s.sample_id] for s in val_select_samples],
                                       deployment["seed"], view=0)
    batch_size = pick_batch_size(backbone, int(cfg.max_batch_size), int(cfg.fallback_batch_size), device, backward=True)
    if env.active():
        # batch_size is the global batch: each rank takes its slice of the batches one process would draw.
        batch_size = env.all_reduce_min(batch_size)
        train_loader = ddp.train_loader(train_set, batch_size, cfg.num_workers, device, int(cfg.seed))
    else:
        train_loader = make_dataloader(train_set, batch_size, train=True, num_workers=cfg.num_workers, device=device,
                                       seed=int(cfg.seed))
    val_loader = make_dataloader(val_set, batch_size, train=False, num_workers=cfg.num_workers, device=device)
    result = train_head(ft_cfg, train_loader, val_loader, out, backbone=backbone, device=device, progress=progress,
                        loss_fn=loss_fn, with_gate=True, init_head_state=init_head_state,
                        select_from_start=True)
    peft_final: dict[str, Any] = {}
    directory = fingerprint = None
    if result.best_adapters is not None:
        saved = load_state_dict_file(result.best_adapters)
        params = dict(backbone.model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        peft_final = verify_peft(reference, backbone.model, sample)
        merged = merge_adapters(backbone)
        if env.is_main():
            _save_merged(merged.model, out / FINETUNED_DIR)
        env.barrier()
        directory = out / FINETUNED_DIR
        fingerprint = DINOv3Backbone.load(directory).fingerprint()
    return FinetuneResult(
        train=result, peft_init=peft_init, peft_final=peft_final, backbone_dir=directory, fingerprint=fingerprint,
        batch_size=batch_size, oom_fallback=batch_size != int(cfg.max_batch_size), images_per_epoch=len(chosen),
        checkpointed_blocks=checkpointed,
    )
