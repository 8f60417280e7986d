"""The three baseline modes run without Dagster (what ``stage1 train --mode ...`` calls).

* ``extract_features``: read the data, build the backbone, write ``train`` and ``val`` features
  (the baseline's file names) plus ``manifest.json`` into ``cached_features_dir``.
* ``train_cached``: read that cache, split ``val`` into val_select / val_calib / val_test by
  sample id (:func:`stage1_core.data.splits.make_splits`), train the head on ``train`` with
  ``val_select`` for selection. A cache written by the old script (no manifest) is imported in
  place first (:func:`import_old_cache`).
* ``train``: the frozen backbone runs on augmented training images every step; val features
  come from the cache (extracted first, reused when present).

Each mode that trains writes into ``output_dir``: ``config.json``, ``splits.json``, the
trainer's outputs (``model_best.pth``, ``checkpoint_last.pth``, the CSV log), the logits of the
*best* checkpoint for val_select, val_calib and val_test (``predictions/<split>.pt``: dict of
``logits``, ``labels``, ``sample_ids``) and ``train_summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stage1_core.artifacts import save_tensors, write_json
from stage1_core.data.datasets import LabelledImageDataset, Sample, find_corrupt_images, read_labels_csv, read_sources
from stage1_core.data.splits import VAL_SPLITS, Splits, make_splits, save_splits
from stage1_core.data.transforms import build_reference_eval_transform, describe_transform
from stage1_core.distributed.extract import extract_features as extract_into_store
from stage1_core.features import (
    MANIFEST_NAME,
    FeatureCacheError,
    TensorSplit,
    import_legacy_cache,
    load_cached_features,
    read_manifest,
)
from stage1_core.model.backbone import DINOv3Backbone
from stage1_core.training.trainer import TrainResult, predict_logits, resolve_device, train_head

logger = logging.getLogger(__name__)

CACHE_SPLITS = ("train", "val")


def synthetic_data_dir(config: Any, artifacts_root: Path) -> Path:
    """Where the synthetic data set of ``config`` lives under ``artifacts_root``."""
    name = f"seed{config.synthetic_seed}_train{config.synthetic_n_train}_val{config.synthetic_n_val}"
    return artifacts_root / "data" / "synthetic" / name


def train_source_configs(config: Any) -> list[tuple[str, str, str]]:
    """``(source, image_dir, labels_file)`` of every training source the flags ask for
    (:func:`stage1_core.data.sources.training_sources`: layouts, ``skip_missing_sources``)."""
    from stage1_core.data.sources import training_sources

    return training_sources(config)


def load_samples(config: Any, artifacts_root: Path, progress: bool = True) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples (generating the synthetic set when ``data_source='synthetic'``).

    With ``skip_corrupt`` undecodable images are dropped here, before splitting, so split ids and
    cached features always agree.
    """
    if config.data_source == "synthetic":
        from stage1_core.data.synthetic import generate_synthetic_dataset

        root = synthetic_data_dir(config, artifacts_root)
        if not ((root / "train_labels.csv").is_file() and (root / "val_labels.csv").is_file()):
            logger.info("generating the synthetic data set in %s", root)
            generate_synthetic_dataset(
                root, config.synthetic_n_train, config.synthetic_n_val, seed=config.synthetic_seed, progress=progress
            )
        train = read_labels_csv(root / "train_labels.csv", root / "train")
        val = read_labels_csv(root / "val_labels.csv", root / "val")
    else:
        problems = config.dataset_problems()
        if problems:
            from stage1_core.config import ConfigError

            raise ConfigError(problems)
        sources = train_source_configs(config)
        train = read_sources(sources) if len(sources) > 1 else read_labels_csv(config.train_labels_file, config.train_image_dir)
        val = read_labels_csv(config.val_labels_file, config.val_image_dir)
    if config.skip_corrupt:
        bad = find_corrupt_images([*train, *val])
        if bad:
            logger.warning("skipping %d undecodable image(s): %s", len(bad), ", ".join(list(bad)[:10]))
            train = [s for s in train if s.sample_id not in bad]
            val = [s for s in val if s.sample_id not in bad]
    return train, val


def build_splits(config: Any, train: Sequence[Sample], val: Sequence[Sample], output_dir: Path) -> Splits:
    """Hash splits of ``val`` (and all of ``train``), written to ``output_dir/splits.json``.

    The assignment uses ``split_seed`` (as the Dagster path does): trying training seeds never
    redraws val_select / val_calib / val_test.
    """
    ratios = (config.val_select_ratio, config.val_calib_ratio, config.val_test_ratio)
    splits = make_splits(train, val, seed=config.split_seed, ratios=ratios)
    save_splits(splits, output_dir / "splits.json")
    return splits


def cache_dir_of(config: Any) -> Path:
    """``cached_features_dir``, or ``<output_dir>/cached_features`` when it is not set."""
    return Path(config.cached_features_dir) if config.cached_features_dir else Path(config.output_dir) / "cached_features"


def load_backbone(config: Any, artifacts_root: Path, device: torch.device) -> DINOv3Backbone:
    backbone = DINOv3Backbone.load(config.model_path, artifacts_root=artifacts_root, device=device)
    logger.info(
        "backbone %s: hidden size %d, %.1fM frozen parameters, fingerprint %s",
        backbone.source, backbone.hidden_size, backbone.frozen_parameters / 1e6, backbone.fingerprint()[:16],
    )
    return backbone


def extract_features(
    config: Any,
    artifacts_root: Path,
    splits: dict[str, Sequence[Sample]],
    cache_dir: Path,
    backbone: DINOv3Backbone,
    device: torch.device,
    progress: bool = True,
):
    """Features of ``splits`` (eval transform) into ``cache_dir``; reused when already there."""
    datasets = {name: LabelledImageDataset(samples) for name, samples in splits.items()}
    transform = describe_transform(next(iter(datasets.values())).transform)
    return extract_into_store(
        backbone,
        datasets,
        cache_dir,
        transform,
        batch_size=None,
        device=device,
        progress=progress,
        max_batch_size=config.max_batch_size,
        fallback_batch_size=config.fallback_batch_size,
        num_workers=config.num_workers,
    )


def run_extract_features(
    config: Any, artifacts_root: Path, progress: bool = True, device: str | None = None
) -> dict[str, Any]:
    """Mode ``extract_features``: ``train`` and ``val`` features into the cache directory."""
    dev = resolve_device(device)
    train, val = load_samples(config, artifacts_root, progress)
    backbone = load_backbone(config, artifacts_root, dev)
    cache = cache_dir_of(config)
    manifest = extract_features(config, artifacts_root, {"train": train, "val": val}, cache, backbone, dev, progress)
    logger.info(
        "feature cache %s: %s (forward passes this run: %d, reused splits: %s)",
        cache, {k: v["num_samples"] for k, v in manifest.splits.items()}, manifest.forward_passes, list(manifest.reused_splits),
    )
    return {"cache_dir": str(cache), "forward_passes": manifest.forward_passes, "key": manifest.key,
            "backbone_fingerprint": manifest.backbone_fingerprint}


def _split_tensors(cache: dict[str, TensorSplit], splits: Splits) -> dict[str, TensorSplit]:
    out = {"train": cache["train"].subset(splits.train, "train")}
    for name in VAL_SPLITS:
        out[name] = cache["val"].subset(splits[name], name)
    return out


def _finish(
    config: Any, output_dir: Path, result: TrainResult, tensors: dict[str, TensorSplit], fingerprint: str, cache_key: str
) -> dict[str, Any]:
    predictions = {}
    if result.best_checkpoint is None:
        raise RuntimeError(f"training produced no best checkpoint (losses finite: {result.losses_finite}); see {result.log_csv}")
    for name in VAL_SPLITS:
        split = tensors[name]
        logits = predict_logits(result.best_checkpoint, split, config)
        path = save_tensors(
            output_dir / "predictions" / f"{name}.pt",
            {"logits": logits, "labels": split.labels.cpu(), "sample_ids": list(split.sample_ids or ())},
        )
        predictions[name] = str(path)
    summary = {k: v for k, v in result.to_dict().items() if k != "history"}
    summary.update(backbone_fingerprint=fingerprint, feature_cache_key=cache_key, predictions=predictions)
    write_json(output_dir / "train_summary.json", summary)
    logger.info(
        "best %s %.4f at epoch %d (val_select accuracy %.2f%%); best head: %s",
        result.selection_metric, result.best_metric, result.best_epoch, 100 * result.best_val_accuracy, result.best_checkpoint,
    )
    return summary


def import_old_cache(config: Any, cache_dir: Path, artifacts_root: Path, device: str | None = None) -> None:
    """Add a manifest to a cache written by the old script (``train_*.pt``, ``val_*.pt``), in place.

    The old script extracted NATIX train and val in the row order of their labels CSVs, so the
    ids come from those CSVs (read without ``skip_corrupt``, as the old script had no such
    option) and their labels are checked against the stored ones. The fingerprint is that of the
    configured ``model_path``, which must be the backbone the old script used.
    """
    if config.data_source != "natix":
        raise FeatureCacheError(f"{cache_dir}: a cache of the old script can only be imported with data_source='natix'")
    logger.info("importing the old script's feature cache in %s (no manifest found)", cache_dir)
    csvs = {
        "train": read_labels_csv(config.train_labels_file, config.train_image_dir),
        "val": read_labels_csv(config.val_labels_file, config.val_image_dir),
    }
    backbone = load_backbone(config, artifacts_root, resolve_device(device))
    import_legacy_cache(
        cache_dir,
        cache_dir,
        sample_ids={name: [s.sample_id for s in samples] for name, samples in csvs.items()},
        expected_labels={name: [s.label for s in samples] for name, samples in csvs.items()},
        backbone_fingerprint=backbone.fingerprint(),
        # The old script preprocessed with torchvision's Resize + CenterCrop: record that transform.
        transform_desc=describe_transform(build_reference_eval_transform()),
    )


def run_train_cached(
    config: Any, artifacts_root: Path, progress: bool = True, device: str | None = None
) -> dict[str, Any]:
    """Mode ``train_cached``: head on cached features; val split by id into select/calib/test."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir_of(config)
    if not (cache_dir / MANIFEST_NAME).is_file() and all((cache_dir / f"{s}_features.pt").is_file() for s in CACHE_SPLITS):
        import_old_cache(config, cache_dir, artifacts_root, device)
    try:
        manifest = read_manifest(cache_dir)
    except FeatureCacheError as exc:
        raise FeatureCacheError(f"{exc}\n  (run --mode extract_features first)") from None
    train, val = load_samples(config, artifacts_root, progress)
    for name, samples in (("train", train), ("val", val)):
        if name not in manifest.splits or manifest.sample_ids(name) != [s.sample_id for s in samples]:
            raise FeatureCacheError(
                f"{cache_dir}: cached split {name!r} does not hold the samples of the configured data "
                f"(ids differ); run --mode extract_features with this configuration"
            )
    splits = build_splits(config, train, val, output_dir)
    config.save(output_dir / "config.json")
    tensors = _split_tensors(load_cached_features(cache_dir, CACHE_SPLITS), splits)
    result = train_head(
        config, tensors["train"], tensors["val_select"], output_dir,
        resume_checkpoint=config.resume_checkpoint, progress=progress, device=device,
    )
    return _finish(config, output_dir, result, tensors, manifest.backbone_fingerprint, manifest.key)


def run_train(config: Any, artifacts_root: Path, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Mode ``train``: frozen backbone on augmented images every step."""
    from stage1_core.data.loaders import make_dataloader, pick_batch_size

    dev = resolve_device(device)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train, val = load_samples(config, artifacts_root, progress)
    splits = build_splits(config, train, val, output_dir)
    config.save(output_dir / "config.json")
    backbone = load_backbone(config, artifacts_root, dev)
    manifest = extract_features(config, artifacts_root, {"val": val}, cache_dir_of(config), backbone, dev, progress)
    cached_val = load_cached_features(manifest.directory, ["val"])["val"]
    tensors = {name: cached_val.subset(splits[name], name) for name in VAL_SPLITS}
    train_set = LabelledImageDataset(train, augment=True, augmentation=config.augmentation)
    batch_size = pick_batch_size(backbone, config.max_batch_size, config.fallback_batch_size, dev, backward=False)
    loader = make_dataloader(train_set, batch_size, train=True, num_workers=config.num_workers, device=dev, seed=config.seed)
    result = train_head(
        config, loader, tensors["val_select"], output_dir, backbone=backbone,
        resume_checkpoint=config.resume_checkpoint, progress=progress, device=dev,
    )
    return _finish(config, output_dir, result, tensors, manifest.backbone_fingerprint, manifest.key)


MODES = {"extract_features": run_extract_features, "train_cached": run_train_cached, "train": run_train}
