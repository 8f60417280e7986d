"""Features of the deployment distribution: challenge views of each split, content-addressed.

With ``deploy_pipeline: streetvision`` a phase's feature section (``cache.json``'s
``deployment``) lists, for its backbone:

- ``mixture``: one draw (view 0) of the pipeline per val_select / val_calib / val_test image - the
  certificate is issued on val_calib's, evaluation reads val_test's;
- ``level0`` .. ``level3``: each val_test image through each level once (the per-level report);
- ``train_view1`` .. ``train_viewK``: K views per training image (``train_views``), beside the
  clean features, sampled per epoch by the trainer.

Each is a feature store keyed like the clean one (backbone fingerprint, transform text, image
sha256 per split), where the transform text names the pipeline with its version and seed
(:func:`stage1_core.data.challenge_views.view_description`): a re-run extracts nothing new, and a
new pipeline version or seed makes new stores and new ids downstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stage1_core.config import Stage1ProConfig
from stage1_core.data.challenge import LEVELS, PIPELINE_ID
from stage1_core.data.splits import VAL_SPLITS
from stage1_core.steps.context import Layout

#: The split of the per-level report.
LEVEL_SPLIT = "val_test"
#: Views of a split: "deploy" (the recorded mixture draw when the pipeline is on, else clean),
#: "clean", or "level0" .. "level3" (val_test only).
VIEWS = ("deploy", "clean", *(f"level{level}" for level in LEVELS))


def deployment_enabled(cfg: Stage1ProConfig) -> bool:
    return cfg.deploy_pipeline == "streetvision"


def _store_spec(name: str, train_views: int) -> tuple[tuple[str, ...], int, int | None]:
    """``(splits, view index, level)`` of a named store."""
    if name == "mixture":
        return VAL_SPLITS, 0, None
    if name.startswith("level"):
        return (LEVEL_SPLIT,), 0, int(name[len("level"):])
    if name.startswith("train_view"):
        view = int(name[len("train_view"):])
        if not 1 <= view <= train_views:
            raise ValueError(f"training view {view} is outside 1..{train_views}")
        return ("train",), view, None
    raise ValueError(f"unknown deployment store {name!r}")


def store_names(train_views: int, with_train: bool) -> list[str]:
    names = ["mixture", *(f"level{level}" for level in LEVELS)]
    if with_train:
        names += [f"train_view{v}" for v in range(1, int(train_views) + 1)]
    return names


def view_store(layout: Layout, fingerprint: str, seed: int, name: str, train_views: int) -> tuple[Path, str, str, dict[str, list[str]]]:
    """``(store directory, key, transform text, content per split)`` of one named store."""
    from stage1_core.data.challenge_views import view_description
    from stage1_core.features import cache_key
    from stage1_core.steps.data import split_content

    splits, view, level = _store_spec(name, train_views)
    text = view_description(seed, view, level)
    content = split_content(layout, splits)
    key = cache_key(fingerprint, text, content)
    return layout.feature_store / key, key, text, content


def ensure_deployment_features(cfg: Stage1ProConfig, layout: Layout, backbone_dir: str | Path, fingerprint: str,
                               with_train: bool) -> dict[str, Any]:
    """Extract (or reuse) every deployment store of this backbone; the ``deployment`` section of cache.json."""
    from stage1_core import features
    from stage1_core.data.challenge_views import ChallengeViewDataset
    from stage1_core.distributed.extract import extract_features
    from stage1_core.model.backbone import DINOv3Backbone
    from stage1_core.steps.data import read_splits

    splits, index = read_splits(layout)
    section: dict[str, Any] = {"pipeline": PIPELINE_ID, "seed": int(cfg.deploy_seed),
                               "train_views": int(cfg.train_views) if with_train else 0, "stores": {}}
    backbone = None
    forward_passes = 0
    for name in store_names(cfg.train_views, with_train):
        store, key, text, content = view_store(layout, fingerprint, cfg.deploy_seed, name, cfg.train_views)
        reused = features.cache_is_valid(store, fingerprint, content, text)
        if not reused:
            if backbone is None:
                backbone = DINOv3Backbone.load(backbone_dir)
                if backbone.fingerprint() != fingerprint:
                    raise ValueError(f"{backbone_dir}: the backbone's fingerprint is {backbone.fingerprint()}, "
                                     f"expected {fingerprint}; re-materialise the asset that wrote it")
            split_names, view, level = _store_spec(name, cfg.train_views)
            datasets = {s: ChallengeViewDataset([index.by_id[i] for i in splits.ids[s]], content[s], cfg.deploy_seed,
                                                view, level) for s in split_names}
            manifest = extract_features(
                backbone, datasets, store, transform_desc=text, sample_ids=content,
                max_batch_size=cfg.max_batch_size, fallback_batch_size=cfg.fallback_batch_size,
                num_workers=cfg.num_workers, progress=True, store_labels=False,
            )
            forward_passes += int(manifest.forward_passes)
        section["stores"][name] = {"key": key, "store": str(store), "reused": bool(reused)}
    section["forward_passes"] = forward_passes
    return section


def load_view(layout: Layout, partition: str, split: str, view: str, fingerprint: str | None = None):
    """One split's features under ``view`` (see :data:`VIEWS`), labels joined from the index, or None.

    None when ``view`` is a deployment view and the phase's features have no deployment section
    (``deploy_pipeline: none``) or the split has no such store: the caller then uses the clean
    features. ``fingerprint`` overrides the phase's backbone (a fine-tuned backbone's stores).
    """
    from stage1_core.artifacts import read_json
    from stage1_core.steps.data import load_store_split
    from stage1_core.store import CACHE_POINTER

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {VIEWS}")
    if view == "clean":
        return None
    pointer = read_json(layout.path("cached_features", partition) / CACHE_POINTER, schema="feature_pointer")
    section = pointer.get("deployment")
    if not section:
        return None
    name = "mixture" if view == "deploy" else view
    if split == "train" and name == "mixture":
        return None
    splits_of_store = _store_spec(name, int(section.get("train_views", 0)))[0]
    if split not in splits_of_store:
        return None
    store, _, _, _ = view_store(layout, fingerprint or pointer["fingerprint"], int(section["seed"]), name,
                                int(section.get("train_views", 0)))
    return load_store_split(layout, store, split)


def training_views(layout: Layout, partition: str) -> list[torch.Tensor]:
    """Features of the cached challenge views of the training split (``[]`` without the pipeline)."""
    from stage1_core.artifacts import read_json
    from stage1_core.features import load_cached_features
    from stage1_core.store import CACHE_POINTER
    from stage1_core.steps.data import read_splits

    pointer = read_json(layout.path("cached_features", partition) / CACHE_POINTER, schema="feature_pointer")
    section = pointer.get("deployment")
    if not section:
        return []
    split_ids, index = read_splits(layout)
    labels = torch.as_tensor(index.labels(list(split_ids.ids["train"])))
    out = []
    for view in range(1, int(section.get("train_views", 0)) + 1):
        store, _, _, _ = view_store(layout, pointer["fingerprint"], int(section["seed"]), f"train_view{view}",
                                    int(section["train_views"]))
        out.append(load_cached_features(store, splits=["train"], labels={"train": labels})["train"].features)
    return out


def deployment_section(layout: Layout, partition: str) -> dict[str, Any] | None:
    """The ``deployment`` section of the phase's cache.json (None: clean path only)."""
    from stage1_core.artifacts import read_json
    from stage1_core.store import CACHE_POINTER

    pointer = read_json(layout.path("cached_features", partition) / CACHE_POINTER, schema="feature_pointer")
    return pointer.get("deployment") or None


def bundle_deployment_parts(cfg: Stage1ProConfig, layout: Layout, partition: str,
                            clean_transform: str) -> tuple[str, dict[str, Path]]:
    """``(transform text, extra files)`` of a phase's bundle.

    With the pipeline on: the deployment transform (a 224 x 224 input passes whole) and the
    served-probability calibrator; otherwise the clean transform and nothing else.
    """
    from stage1_core.bundle.load import SERVED_CALIBRATOR_FILE
    from stage1_core.data.transforms import build_deploy_transform, describe_transform
    from stage1_core.store import SERVED_FILE

    if deployment_section(layout, partition) is None:
        return clean_transform, {}
    served = layout.path("exit_policy", partition) / SERVED_FILE
    if not served.is_file():
        raise FileNotFoundError(f"{served} not found: exit_policy[{partition}] was fit without the served-probability "
                                f"calibrator; re-materialise exit_policy")
    return describe_transform(build_deploy_transform()), {SERVED_CALIBRATOR_FILE: served}


def finetune_deployment(layout: Layout, partition: str) -> dict[str, Any] | None:
    """What fine-tuning needs to apply the pipeline on the fly (None without it)."""
    from stage1_core.steps.data import read_splits

    section = deployment_section(layout, partition)
    if section is None:
        return None
    splits, index = read_splits(layout)
    ids = [*splits.ids["train"], *splits.ids["val_select"]]
    return {"seed": int(section["seed"]), "train_views": int(section["train_views"]),
            "sha256": {i: index.sha256[i] for i in ids}}
