"""Backbone and feature steps: which weights a phase uses, and their CLS features per split.

The feature store is content-addressed: its key is the backbone fingerprint, the transform and
the sha256 of every image (per split, in split order). Labels are never stored with features:
:func:`load_split` joins them from the dataset index, so a corrected label is used at once and
the features are reused with zero forward passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stage1_core.artifacts import read_json, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.splits import SPLIT_NAMES
from stage1_core.phases import get_recipe
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.data import load_store_split, read_splits, split_content
from stage1_core.store import BACKBONE_FILE, CACHE_POINTER, read_backbone, read_training



def prepare_backbone(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Resolve the phase's backbone (``recipe.backbone_kind``), fingerprint it, write backbone.json.

    ``source``: ``model_path`` (builtin or a local directory). ``explora``: the source adapted by
    ExPLoRA on the train images (see :mod:`stage1_core.steps.adaptation`). ``previous``: the
    fine-tuned, merged backbone of the phase this one builds on (:func:`previous_backbone_phase`).
    """
    from stage1_core.model.backbone import DINOv3Backbone, resolve_backbone

    ctx = StepContext(config, layout, partition)
    recipe = get_recipe(partition)
    source_dir = resolve_backbone(ctx.cfg.model_path, layout.root)
    inputs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    figures: dict[str, Path] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    if recipe.backbone_kind == "source":
        ctx.require("backbone", [])  # no inputs: takes the write lock of backbone[partition]
        directory = source_dir
    elif recipe.backbone_kind == "explora":
        from stage1_core.steps.adaptation import adapt_with_explora

        inputs = ctx.require("backbone", [("splits", None), ("dataset_index", None)])
        splits, index = read_splits(layout)
        adapted = adapt_with_explora(ctx.cfg, source_dir, layout.root, splits, index)
        directory = Path(adapted["directory"])
        extra = {"explora": {k: v for k, v in adapted.items() if k not in ("directory", "figure")}}
        figures["ExPLoRA reconstruction loss"] = Path(adapted["figure"])
        tables["explora_epochs"] = list(adapted["history"]["epochs"])
    elif recipe.backbone_kind == "previous":

        base = previous_backbone_phase(layout, partition)
        inputs = ctx.require("backbone", [("checkpoint", base)])
        tuned = read_training(layout, base).get("finetuned_backbone")
        if not tuned:
            raise ValueError(f"{partition} builds on {base}'s fine-tuned backbone, but checkpoint[{base}] has none "
                             f"(its recipe does not fine-tune the backbone)")
        directory = layout.path("checkpoint", base) / tuned["directory"]
        extra = {"built_on": base, "built_on_checkpoint_id": read_training(layout, base)["checkpoint_id"]}
    else:
        raise ValueError(f"{partition}: unknown backbone_kind {recipe.backbone_kind!r} in the phase table")
    model = DINOv3Backbone.load(directory)
    info = {
        "phase": partition,
        "model_path": ctx.cfg.model_path,
        "directory": str(directory),
        "fingerprint": model.fingerprint(),
        "hidden_size": int(model.hidden_size),
        "adaptation": recipe.backbone,
        "backbone_kind": recipe.backbone_kind,
        "frozen_parameters": int(model.frozen_parameters),
        **extra,
    }
    out_dir = layout.dir("backbone", partition)
    path = write_json(out_dir / BACKBONE_FILE, info, schema="backbone")
    record = ctx.finish("backbone", [BACKBONE_FILE], inputs, id_parts={"fingerprint": info["fingerprint"]})
    metadata = {k: v for k, v in info.items() if k != "explora"}
    if "explora" in extra:
        gain = extra["explora"]["gain"]
        metadata.update(explora_reused=extra["explora"]["reused"], explora_held_out_start=gain["start"],
                        explora_held_out_end=gain["end"], explora_relative_reduction=gain["relative_reduction"],
                        explora_control_end=gain.get("control_end"),
                        explora_gain_over_control=gain.get("relative_to_control"),
                        explora_trainable_fraction=extra["explora"]["parameters"]["backbone_fraction"])
    return StepResult(path, {**metadata, "lineage_id": record.id}, tables=tables, figures=figures, record=record)


def previous_backbone_phase(layout: Layout, partition: str) -> str:
    """The phase whose fine-tuned backbone ``partition`` builds on: the last required phase that ran.

    Phase 6 requires 4 and, when it was attempted and not skipped, 5 (whose gate then must have
    passed: the Dagster guard refuses phase 6 otherwise). So: phase 5 when ``checkpoint[phase5]``
    exists and phase 5 is not skipped, else phase 4.
    """
    from stage1_core.lineage import record_path
    from stage1_core.phase_state import read_skip
    from stage1_core.phases import PHASES, phase_number

    recipe = PHASES[phase_number(partition)]
    for number in sorted(recipe.requires, reverse=True):
        key = PHASES[number].key
        attempted = record_path(layout.path("checkpoint", key)).is_file()
        if PHASES[number].optional and (not attempted or read_skip(layout, key) is not None):
            continue
        return key
    raise ValueError(f"{partition} names no earlier phase to build its backbone on")


def eval_transform():
    from stage1_core.data.transforms import build_eval_transform, describe_transform

    transform = build_eval_transform()
    return transform, describe_transform(transform)


def ensure_features(cfg: Stage1ProConfig, layout: Layout, backbone_dir: str | Path, fingerprint: str,
                    split_names: tuple[str, ...]) -> tuple[Path, str, bool, int]:
    """The content-addressed store holding ``split_names`` for this backbone, extracted when missing.

    Returns ``(store, key, reused, forward_passes)``. The key covers the backbone fingerprint,
    the transform and the image content of exactly ``split_names``.
    """
    from stage1_core import features
    from stage1_core.data.datasets import LabelledImageDataset
    from stage1_core.distributed.extract import extract_features
    from stage1_core.model.backbone import DINOv3Backbone

    splits, index = read_splits(layout)
    transform, transform_desc = eval_transform()
    content = split_content(layout, split_names)
    key = features.cache_key(fingerprint, transform_desc, content)
    store = layout.feature_store / key
    if features.cache_is_valid(store, fingerprint, content, transform_desc):
        return store, key, True, 0
    datasets = {name: LabelledImageDataset([index.by_id[i] for i in splits.ids[name]], transform=transform)
                for name in split_names}
    backbone = DINOv3Backbone.load(backbone_dir)
    if backbone.fingerprint() != fingerprint:
        raise ValueError(f"{backbone_dir}: the backbone's fingerprint is {backbone.fingerprint()}, expected "
                         f"{fingerprint}; re-materialise the asset that wrote it")
    manifest = extract_features(
        backbone, datasets, store, transform_desc=transform_desc, sample_ids=content,
        max_batch_size=cfg.max_batch_size, fallback_batch_size=cfg.fallback_batch_size,
        num_workers=cfg.num_workers, progress=True, store_labels=False,
    )
    return store, key, False, int(manifest.forward_passes)


def ensure_phase_features(cfg: Stage1ProConfig, layout: Layout,
                          info: dict[str, Any]) -> tuple[Path, str, bool, int, dict[str, Any] | None]:
    """Every feature store of a phase's backbone: the clean splits, then (deployment pipeline on)
    the challenge views (:mod:`stage1_core.steps.deployment`).

    The collective part of ``cached_features``: every rank of a ``torchrun`` job calls it with the
    same arguments, so each sharded extraction has all its ranks. Returns the clean store, its key,
    whether it was reused, the forward passes, and the ``deployment`` section of cache.json or None.
    """
    from stage1_core.steps.deployment import deployment_enabled, ensure_deployment_features

    store, key, reused, forward_passes = ensure_features(cfg, layout, info["directory"], info["fingerprint"],
                                                         SPLIT_NAMES)
    deployment = None
    if deployment_enabled(cfg):
        deployment = ensure_deployment_features(cfg, layout, info["directory"], info["fingerprint"], with_train=True)
    return store, key, reused, forward_passes, deployment


def cache_features(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """CLS features of every split in a content-addressed store; reused when already there."""
    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("cached_features", [("backbone", partition), ("splits", None)])
    info = read_backbone(layout, partition)
    splits, _ = read_splits(layout)
    _, transform_desc = eval_transform()
    store, key, reused, forward_passes, deployment = ensure_phase_features(ctx.cfg, layout, info)
    pointer = {"store": str(store), "key": key, "fingerprint": info["fingerprint"], "reused": reused,
               "forward_passes": forward_passes, "transform": transform_desc,
               **{f"n_{name}": len(splits.ids[name]) for name in SPLIT_NAMES}}
    id_parts: dict[str, Any] = {"key": key}
    if deployment is not None:
        pointer["deployment"] = deployment
        id_parts["deployment"] = {name: entry["key"] for name, entry in deployment["stores"].items()}
    out_dir = layout.dir("cached_features", partition)
    path = write_json(out_dir / CACHE_POINTER, pointer, schema="feature_pointer")
    from stage1_core.features import MANIFEST_NAME

    record = ctx.finish("cached_features", [CACHE_POINTER, store / MANIFEST_NAME], inputs, id_parts=id_parts)
    metadata = {**{k: v for k, v in pointer.items() if k != "deployment"}, "lineage_id": record.id}
    if "deployment" in pointer:
        metadata.update(deploy_pipeline=pointer["deployment"]["pipeline"], deploy_seed=pointer["deployment"]["seed"],
                        train_views=pointer["deployment"]["train_views"],
                        deploy_forward_passes=pointer["deployment"]["forward_passes"])
    if info.get("backbone_kind", "source") != "source":
        metadata.update(probe_comparison(ctx.cfg, layout, partition))
    return StepResult(path, metadata, record=record)


def probe_comparison(cfg: Stage1ProConfig, layout: Layout, partition: str) -> dict[str, Any]:
    """val_select accuracy of a logistic probe on this phase's features vs the source backbone's.

    Measures what adapting the backbone did to the frozen features (before any fine-tuning).
    The source features come from the store phases 1-3 filled; without them the comparison is
    reported as unavailable rather than computed again.
    """
    from stage1_core import features
    from stage1_core.baselines import logistic_probe_accuracy
    from stage1_core.model.backbone import DINOv3Backbone, resolve_backbone

    def probe(store: Path) -> float:
        splits, index = read_splits(layout)
        data = features.load_cached_features(
            store, splits=["train", "val_select"],
            labels={n: torch.as_tensor(index.labels(list(splits.ids[n]))) for n in ("train", "val_select")})
        return logistic_probe_accuracy(data["train"].features.numpy(), data["train"].labels.numpy(),
                                       data["val_select"].features.numpy(), data["val_select"].labels.numpy(),
                                       seed=cfg.seed, class_weighting=cfg.class_weighting)

    pointer = read_json(layout.path("cached_features", partition) / CACHE_POINTER, schema="feature_pointer")
    source = DINOv3Backbone.load(resolve_backbone(cfg.model_path, layout.root))
    _, transform_desc = eval_transform()
    source_store = layout.feature_store / features.cache_key(source.fingerprint(), transform_desc,
                                                             split_content(layout, SPLIT_NAMES))
    out: dict[str, Any] = {"probe_val_select_accuracy": probe(Path(pointer["store"]))}
    if (source_store / features.MANIFEST_NAME).is_file():
        out["probe_val_select_accuracy_source_backbone"] = probe(source_store)
    else:
        out["probe_val_select_accuracy_source_backbone"] = None
    return out


def load_split(layout: Layout, partition: str, split: str, view: str = "deploy"):
    """One split's features (from the phase's store) with labels joined from the dataset index.

    ``view="deploy"``: the recorded challenge draw for val splits when the phase runs the
    deployment pipeline (:func:`stage1_core.steps.deployment.load_view`), else the clean features.
    """
    from stage1_core.steps.deployment import load_view

    deployed = load_view(layout, partition, split, view)
    if deployed is not None:
        return deployed
    pointer = read_json(layout.path("cached_features", partition) / CACHE_POINTER, schema="feature_pointer")
    return load_store_split(layout, pointer["store"], split)


def load_split_features(layout: Layout, partition: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of one split."""
    data = load_split(layout, partition, split)
    return data.features, data.labels


def model_features(layout: Layout, partition: str, split: str, view: str = "deploy"):
    """Features the phase's *model* sees on ``split``: its fine-tuned backbone's, else cached_features'.

    A checkpoint that fine-tuned its backbone (phases 4-5) has its own features, extracted by the
    predictions step into the feature store under that backbone's fingerprint; every reader
    (evaluation, bundle verification, gate criteria) goes through this function.
    """
    from stage1_core.data.splits import VAL_SPLITS
    from stage1_core.features import cache_key
    from stage1_core.steps.deployment import load_view

    tuned = read_training(layout, partition).get("finetuned_backbone")
    if not tuned:
        return load_split(layout, partition, split, view)
    if split not in VAL_SPLITS:
        raise ValueError(f"{partition}: features of the fine-tuned backbone exist for {VAL_SPLITS} only, not {split!r}")
    deployed = load_view(layout, partition, split, view, fingerprint=tuned["fingerprint"])
    if deployed is not None:
        return deployed
    _, transform_desc = eval_transform()
    store = layout.feature_store / cache_key(tuned["fingerprint"], transform_desc, split_content(layout, VAL_SPLITS))
    return load_store_split(layout, store, split)
