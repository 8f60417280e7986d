"""Data layer: labelled datasets, transforms, loaders, splits and the synthetic data set.

Names are imported lazily, so ``import stage1_core.data.synthetic`` (used by the generator's
worker processes) does not pull in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "datasets": (
        "CorruptImageError",
        "DatasetValidationError",
        "LabelledImageDataset",
        "MultiRoadworkDataset",
        "NATIXDataset",
        "NATIX_SOURCE",
        "Sample",
        "find_corrupt_images",
        "load_rgb",
        "read_labels_csv",
        "read_sources",
        "to_rgb",
    ),
    "transforms": (
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "build_eval_transform",
        "build_train_transform",
        "describe_transform",
    ),
    "loaders": ("make_dataloader", "pick_batch_size", "resolve_num_workers"),
    "splits": (
        "SPLIT_NAMES",
        "SPLIT_ROLES",
        "USAGE_RULES",
        "VAL_SPLITS",
        "SplitError",
        "Splits",
        "assign_val_split",
        "load_splits",
        "make_splits",
        "require_role",
        "require_stored_as",
        "require_split",
        "save_splits",
        "split_of_ids",
    ),
    "synthetic": ("SyntheticSummary", "generate_synthetic_dataset"),
}
_LOCATION = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_LOCATION)


def __getattr__(name: str) -> Any:
    module = _LOCATION.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
