"""Backbone and feature steps: which weights a phase uses, and their CLS features per split.

The feature store is content-addressed: its key is the backbone fingerprint, the transform and
the sha256 of every image (per split, in split order). Labels are never stored with features:
:func:`load_split` joins them from the dataset index, so a corrected label is used at once and
the features are reused with zero forward passes.
"""

from __future__ import annotations

from typing import Any

import torch

from stage1_core.artifacts import read_json, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.splits import SPLIT_NAMES
from stage1_core.phases import get_recipe
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.data import read_splits

BACKBONE_FILE = "backbone.json"
CACHE_POINTER = "cache.json"


def prepare_backbone(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Resolve the phase's backbone (builtin or a local directory), fingerprint it, write backbone.json."""
    from stage1_core.model.backbone import DINOv3Backbone, resolve_backbone

    ctx = StepContext(config, layout, partition)
    directory = resolve_backbone(ctx.cfg.model_path, layout.root)
    model = DINOv3Backbone.load(directory)
    info = {
        "phase": partition,
        "model_path": ctx.cfg.model_path,
        "directory": str(directory),
        "fingerprint": model.fingerprint(),
        "hidden_size": int(model.hidden_size),
        "adaptation": get_recipe(partition).backbone,
        "frozen_parameters": int(model.frozen_parameters),
    }
    out_dir = layout.dir("backbone", partition)
    path = write_json(out_dir / BACKBONE_FILE, info, schema="backbone")
    record = ctx.finish("backbone", [BACKBONE_FILE], [], id_parts={"fingerprint": info["fingerprint"]})
    return StepResult(path, {**info, "lineage_id": record.id}, record=record)


def read_backbone(layout: Layout, partition: str) -> dict[str, Any]:
    return read_json(layout.path("backbone", partition) / BACKBONE_FILE, schema="backbone")


def eval_transform():
    from stage1_core.data.transforms import build_eval_transform, describe_transform

    transform = build_eval_transform()
    return transform, describe_transform(transform)


def cache_features(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """CLS features of every split in a content-addressed store; reused when already there."""
    from stage1_core import features
    from stage1_core.data.datasets import LabelledImageDataset
    from stage1_core.model.backbone import DINOv3Backbone

    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("cached_features", [("backbone", partition), ("splits", None)])
    info = read_backbone(layout, partition)
    splits, index = read_splits(layout)
    transform, transform_desc = eval_transform()
    content = {name: [index.sha256[i] for i in splits.ids[name]] for name in SPLIT_NAMES}
    key = features.cache_key(info["fingerprint"], transform_desc, content)
    store = layout.feature_store / key
    reused = features.cache_is_valid(store, info["fingerprint"], content, transform_desc)
    forward_passes = 0
    if not reused:
        datasets = {
            name: LabelledImageDataset([index.by_id[i] for i in splits.ids[name]], transform=transform)
            for name in SPLIT_NAMES
        }
        backbone = DINOv3Backbone.load(info["directory"])
        manifest = features.extract_split_features(
            backbone, datasets, store, transform_desc=transform_desc, sample_ids=content,
            max_batch_size=ctx.cfg.max_batch_size, fallback_batch_size=ctx.cfg.fallback_batch_size,
            num_workers=ctx.cfg.num_workers, progress=True, store_labels=False,
        )
        forward_passes = int(manifest.forward_passes)
    pointer = {"store": str(store), "key": key, "fingerprint": info["fingerprint"], "reused": reused,
               "forward_passes": forward_passes, "transform": transform_desc,
               **{f"n_{name}": len(splits.ids[name]) for name in SPLIT_NAMES}}
    out_dir = layout.dir("cached_features", partition)
    path = write_json(out_dir / CACHE_POINTER, pointer, schema="feature_pointer")
    manifest_file = store / features.MANIFEST_NAME
    record = ctx.finish("cached_features", [CACHE_POINTER, manifest_file], inputs, id_parts={"key": key})
    return StepResult(path, {**pointer, "lineage_id": record.id}, record=record)


def load_split(layout: Layout, partition: str, split: str):
    """One split's features (from the phase's store) with labels joined from the dataset index."""
    from stage1_core.features import TensorSplit, load_cached_features

    pointer = read_json(layout.path("cached_features", partition) / CACHE_POINTER, schema="feature_pointer")
    splits, index = read_splits(layout)
    ids = list(splits.ids[split])
    labels = torch.as_tensor(index.labels(ids))
    data = load_cached_features(pointer["store"], splits=[split], labels={split: labels})[split]
    return TensorSplit(data.features, data.labels, tuple(ids), split)


def load_split_features(layout: Layout, partition: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of one split."""
    data = load_split(layout, partition, split)
    return data.features, data.labels
