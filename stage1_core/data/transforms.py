"""Image transforms (torchvision.transforms.v2): two training recipes and the evaluation one.

All pipelines take a PIL RGB image and return a normalised float32 tensor ``[3, H, W]``.
``moderate`` is the baseline's training recipe, ``aggressive`` the stronger one; evaluation is
Resize(256, bicubic) + CenterCrop(224). :func:`describe_transform` gives a stable text form of a
pipeline, used to key feature caches (same text, same preprocessing).
"""

from __future__ import annotations

import enum
import functools
import types
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("aggressive", "moderate")

BICUBIC = v2.InterpolationMode.BICUBIC


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def build_train_transform(
    kind: str = "moderate",
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Training augmentation.

    ``aggressive``: RandomResizedCrop(scale .7-1, ratio .7-1.4, bicubic), HFlip .5,
    ColorJitter(.2, .2, .2, .1), RandomErasing(p .4, scale .02-.4).
    ``moderate`` (baseline): RandomResizedCrop(scale .8-1, ratio .75-1.33, bicubic), HFlip .5,
    no colour jitter, RandomErasing(p .25, scale .02-.33, ratio .3-3.3).
    Erasing runs on the normalised tensor (erased pixels = 0 = the channel mean).
    """
    if kind == "aggressive":
        geometric = [
            v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.7, 1.4), interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
        ]
        erasing = v2.RandomErasing(p=0.4, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=0)
    elif kind == "moderate":
        geometric = [
            v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.75, 1.33), interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
        ]
        erasing = v2.RandomErasing(p=0.25, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    else:
        raise ValueError(f"augmentation kind {kind!r} is not supported - use one of {', '.join(AUGMENTATIONS)}")
    return v2.Compose([*geometric, *_to_normalised_tensor(mean, std), erasing])


def build_eval_transform(
    image_size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Deterministic evaluation preprocessing: Resize(shorter side ``resize``, bicubic), CenterCrop."""
    if resize < image_size:
        raise ValueError(f"resize={resize} is smaller than image_size={image_size} - resize must be >= image_size")
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_tensor(mean, std),
        ]
    )


def _format_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float):
        return repr(round(value, 10))
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        items = sorted(((str(_format_value(k)), _format_value(v)) for k, v in value.items()))
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    raise TypeError(f"cannot describe transform parameter of type {type(value).__name__}")


def _describable(value: Any) -> bool:
    try:
        _format_value(value)
    except TypeError:
        return False
    return True


def describe_transform(transform: Any) -> str:
    """Stable one-line text of a (possibly composed) transform: class names and public parameters.

    Parameters are taken from each transform's public attributes, sorted by name, with floats
    rounded, so the text depends only on what the pipeline does, not on object ids or on how
    ``repr`` is formatted by a given torchvision release. A plain function is named by its module
    and qualified name (its body is not described: rename it when its behaviour changes).
    """
    if isinstance(transform, v2.Compose):
        return "Compose[" + "; ".join(describe_transform(t) for t in transform.transforms) + "]"
    if isinstance(transform, (v2.RandomApply, v2.RandomChoice, v2.RandomOrder)):
        inner = "; ".join(describe_transform(t) for t in transform.transforms)
        params = {k: v for k, v in vars(transform).items() if k in ("p",) and _describable(v)}
        extra = ", ".join(f"{k}={_format_value(v)}" for k, v in sorted(params.items()))
        return f"{type(transform).__name__}({extra})[{inner}]"
    if isinstance(transform, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        func = transform.func if isinstance(transform, functools.partial) else transform
        return f"{func.__module__}.{func.__qualname__}"
    params = {
        key: value
        for key, value in sorted(vars(transform).items())
        if not key.startswith("_") and key != "training" and _describable(value)
    }
    inner = ", ".join(f"{key}={_format_value(value)}" for key, value in params.items())
    return f"{type(transform).__name__}({inner})"
