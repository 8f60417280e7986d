"""Backbone adaptation for phases that do not use the source weights as they are.

``explora`` (phase 4, reused by phase 5): continued masked-image pre-training of the source
backbone on the train split's images (labels unused) plus ``unlabeled_image_dir``, then the LoRA
adapters merged and the result saved in Hugging Face format. Validation images never enter it
(:func:`stage1_core.domain_adaptation.data.unlabeled_images` refuses them).

The adapted backbone lives in a content-addressed store, ``<artifacts>/backbone_store/<key>``,
keyed by the source fingerprint, the ExPLoRA settings and the sha256 of every pre-training and
held-out image. A phase asking for the same adaptation (phase 5 after phase 4) reuses it with no
training at all. The store directory is complete only once ``adapted.json`` exists (written
last); an interrupted run resumes from the per-epoch ExPLoRA checkpoint in the same directory.

Alongside, a decoder-only control run (the same decoder, data and steps on the frozen source)
tells how much of the held-out reconstruction gain comes from adapting the backbone rather than
from training a decoder from scratch; it is reported, and the gate judges the stated margin.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from stage1_core.artifacts import read_json, write_json
from stage1_core.lineage import canonical_json
from stage1_core.locking import default_timeout, path_lock

STORE_DIR = "backbone_store"
MODEL_DIR = "model"
MARKER = "adapted.json"
CHECKPOINT = "explora_checkpoint.pt"
CONTROL_CHECKPOINT = "control_checkpoint.pt"
FIGURE = "explora_losses.png"


def explora_settings(cfg: Any) -> dict[str, Any]:
    """The ExPLoRA settings a phase config asks for (the numbers that change the adapted weights)."""
    return {
        "epochs": int(cfg.explora_epochs),
        "lora_r": int(cfg.explora_r),
        "unfrozen_blocks": int(cfg.explora_unfrozen_blocks),
        "mask_ratio": float(cfg.explora_mask_ratio),
        "lr": float(cfg.explora_lr),
        "batch_size": int(cfg.explora_batch_size),
        "max_images": cfg.explora_max_images,
        "held_out_images": int(cfg.explora_held_out_images),
        "seed": int(cfg.seed),
    }


def _explora_config(settings: dict[str, Any], num_workers: int, train_backbone: bool = True,
                    gradient_checkpointing: bool = False):
    from stage1_core.domain_adaptation.explora import ExPLoRAConfig

    return ExPLoRAConfig(
        unfrozen_blocks=settings["unfrozen_blocks"], lora_r=settings["lora_r"], mask_ratio=settings["mask_ratio"],
        epochs=settings["epochs"], lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"],
        max_images=settings["max_images"], held_out_images=settings["held_out_images"], num_workers=num_workers,
        train_backbone=train_backbone, gradient_checkpointing=gradient_checkpointing,
    )


def pretraining_images(cfg: Any, splits: Any, index: Any) -> tuple[list[Path], list[Path], list[str]]:
    """``(pre-training paths, held-out paths, their sha256 in that order)``; never a val image.

    The held-out images are a fixed subset of the train split (seeded by ``seed``); they are not
    pre-trained on, so their reconstruction loss measures generalisation.
    """
    from stage1_core.data.splits import VAL_SPLITS
    from stage1_core.domain_adaptation.data import split_held_out, unlabeled_images

    train_paths = [Path(index.by_id[i].path) for i in splits.ids["train"]]
    forbidden = [index.by_id[i].path for name in VAL_SPLITS for i in splits.ids[name]]
    paths = unlabeled_images(train_paths, cfg.unlabeled_image_dir, forbidden=forbidden)
    pretrain, held_out = split_held_out(paths, int(cfg.explora_held_out_images), seed=int(cfg.seed))
    digest_of = {Path(index.by_id[i].path).resolve(): index.sha256[i] for i in splits.ids["train"]}
    from stage1_core.artifacts import sha256_file

    digests = [digest_of.get(p) or sha256_file(p) for p in (*pretrain, *held_out)]
    return pretrain, held_out, digests


def store_key(source_fingerprint: str, settings: dict[str, Any], image_digests: list[str], n_pretrain: int) -> str:
    """Content address of an adaptation: source weights + settings + exact images (and their roles)."""
    payload = canonical_json({"source": source_fingerprint, "method": "explora", "settings": settings,
                              "n_pretrain": n_pretrain, "images": image_digests})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_adapted(store: Path) -> dict[str, Any] | None:
    """The marker of a complete adaptation in ``store`` (None when absent or incomplete)."""
    marker = store / MARKER
    if not marker.is_file() or not (store / MODEL_DIR / "config.json").is_file():
        return None
    return read_json(marker)


def adapt_with_explora(cfg: Any, source_dir: Path, root: Path, splits: Any, index: Any,
                       progress: bool = True) -> dict[str, Any]:
    """Run (or reuse) ExPLoRA for the source backbone in ``source_dir``; return the marker document.

    The document holds the adapted model directory, both fingerprints, the settings, the history
    (per-epoch loss, held-out loss at start and end), the control run's held-out loss, the
    reconstruction gain and the trainable-parameter report.
    """
    from stage1_core.model.backbone import DINOv3Backbone

    source = DINOv3Backbone.load(source_dir)
    settings = explora_settings(cfg)
    pretrain, held_out, digests = pretraining_images(cfg, splits, index)
    key = store_key(source.fingerprint(), settings, digests, len(pretrain))
    store = root / STORE_DIR / key
    from stage1_core.distributed import env

    if not env.is_main():
        # Under torchrun the other ranks follow rank 0 (their collectives keep them in step): rank 0
        # alone holds the store's lock, cleans and writes it. They look at the store only once rank 0
        # holds the lock and has cleaned it, so every rank sees the same store and decides alike
        # (reuse or train) even when another job held the lock first and completed it meanwhile.
        env.barrier()
        return _adapt_into(store, key, cfg, source, settings, pretrain, held_out)
    # Phases 4 and 5 share this store: one of them adapts, the other waits (or is refused) and reuses.
    with path_lock(root / STORE_DIR / f".{key}.lock", f"ExPLoRA backbone store {key}", timeout=default_timeout()):
        from stage1_core.dirswap import clean_leftovers

        clean_leftovers(store)  # a merge staged by a killed run
        env.barrier()
        return _adapt_into(store, key, cfg, source, settings, pretrain, held_out)


def _adapt_into(store: Path, key: str, cfg: Any, source: Any, settings: dict[str, Any], pretrain: list[Path],
                held_out: list[Path]) -> dict[str, Any]:
    """Reuse the adaptation complete in ``store``, or run ExPLoRA into it (the caller holds its lock)."""
    import torch

    from stage1_core.data.loaders import resolve_num_workers
    from stage1_core.domain_adaptation.data import (
        UnlabeledImageDataset,
        build_pretrain_eval_transform,
        build_pretrain_transform,
    )
    from stage1_core.domain_adaptation.explora import ExPLoRATrainer, plot_explora_losses, reconstruction_gain
    from stage1_core.model.backbone import DINOv3Backbone
    from stage1_core.training.seeding import seed_everything

    done = read_adapted(store)
    if done is not None:
        # The margin is the gate's, read from the live config and recorded with this backbone.
        gain = reconstruction_gain(done["history"], margin=float(cfg.explora_min_gain), control=done["control_history"])
        return {**done, "gain": gain, "reused": True}
    store.mkdir(parents=True, exist_ok=True)
    image_size = int(source.config.image_size)
    train_set = UnlabeledImageDataset(pretrain, transform=build_pretrain_transform(image_size=image_size))
    held_set = UnlabeledImageDataset(held_out, transform=build_pretrain_eval_transform(image_size))
    workers = resolve_num_workers(cfg.num_workers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed_everything(int(cfg.seed))
    explora = _explora_config(settings, workers, gradient_checkpointing=bool(cfg.gradient_checkpointing))
    trainer = ExPLoRATrainer(source, explora, device=device)
    history = trainer.fit(train_set, held_out=held_set, checkpoint_path=store / CHECKPOINT)
    control = ExPLoRATrainer(source, _explora_config(settings, workers, train_backbone=False), device=device)
    control_history = control.fit(train_set, held_out=held_set, checkpoint_path=store / CONTROL_CHECKPOINT)
    model_dir = trainer.merge_and_save(store / MODEL_DIR)
    adapted = DINOv3Backbone.load(model_dir)
    gain = reconstruction_gain(history, margin=float(cfg.explora_min_gain), control=control_history)
    from stage1_core.distributed import env

    if not env.is_main():  # the other ranks of a torchrun job trained with rank 0, which writes the store
        return {"directory": str(model_dir), "fingerprint": adapted.fingerprint(), "reused": False}
    figure = plot_explora_losses(history, store / FIGURE)
    marker = {
        "method": "explora",
        "objective": "MAE-style: 75% of patches masked through bool_masked_pos, a light decoder reconstructs "
                     "normalised pixels, MSE on masked patches (ExPLoRA itself keeps the source model's objective)",
        "key": key,
        "directory": str(model_dir),
        "source_fingerprint": source.fingerprint(),
        "fingerprint": adapted.fingerprint(),
        "settings": settings,
        "n_pretrain_images": len(pretrain),
        "n_held_out_images": len(held_out),
        "unlabeled_image_dir": cfg.unlabeled_image_dir,
        "history": history,
        "control_history": control_history,
        "gain": gain,
        "losses_finite": all(_finite(e["train_loss"]) for e in history["epochs"]),
        "parameters": trainer.parameter_report(),
        "figure": str(figure),
        "device": device,
    }
    write_json(store / MARKER, marker)
    for leftover in (CHECKPOINT, CONTROL_CHECKPOINT):
        (store / leftover).unlink(missing_ok=True)
    return {**marker, "reused": False}


def _finite(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)
