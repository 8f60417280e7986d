"""Image transforms (torchvision.transforms.v2): two training recipes and the evaluation one.

All pipelines take a PIL RGB image and return a normalised float32 tensor ``[3, H, W]``.
``moderate`` is the baseline's training recipe, ``aggressive`` the stronger one; evaluation is
:class:`ResizedCenterCrop` (the shorter side to 256, bicubic, then the central 224 x 224) and
ImageNet normalisation. :func:`describe_transform` gives a stable text form of a pipeline, used to
key feature caches (same text, same preprocessing).
"""

from __future__ import annotations

import enum
import functools
import types
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("aggressive", "moderate", "light")

BICUBIC = v2.InterpolationMode.BICUBIC

#: Pillow's resampling filter for each torchvision interpolation mode ResizedCenterCrop accepts.
PIL_FILTERS = {
    v2.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    v2.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    v2.InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


class ResizedCenterCrop(v2.Transform):
    """Resize the shorter side to ``size`` (antialiased), then keep the central ``crop_size``.

    What ``v2.Resize(size)`` followed by ``v2.CenterCrop(crop_size)`` computes, done as one
    resampling of the crop's source box (Pillow's ``Image.resize(box=...)``): only the pixels that
    survive the crop are computed - about 45% fewer than resizing the whole image first - and the
    per-image preprocessing cost of the feature cache and of ``Stage1Bundle.predict`` falls with
    them (``benchmarks/bench_extract.py``). The output sizes and crop offsets are torchvision's.
    The values are not bit-identical to the two-step reference (:func:`build_reference_eval_transform`):
    Pillow takes the box in single precision and may order its two passes differently, so on the
    embedded default's images a value differs by at most 2/255 and about 0.05% of values differ at
    all (``tests/unit/test_transforms.py``); on synthetic white noise, the worst case for a
    separable filter's rounding, isolated values differ by up to ~25/255. Training, evaluation and
    deployment all use this transform, so they agree exactly with each other. Tensors take the
    reference two-step path.
    """

    def __init__(self, size: int, crop_size: int | Sequence[int], interpolation: v2.InterpolationMode = BICUBIC,
                 antialias: bool = True) -> None:
        super().__init__()
        crop = (int(crop_size), int(crop_size)) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop_size must be an int or (height, width), got {crop_size!r}")
        if int(size) < max(crop):
            raise ValueError(f"size={size} is smaller than crop_size={crop} - the crop must fit in the resized image")
        if interpolation not in PIL_FILTERS:
            raise ValueError(f"interpolation {interpolation} is not supported - use one of {sorted(m.name for m in PIL_FILTERS)}")
        if antialias is not True:
            raise ValueError("ResizedCenterCrop always antialiases (Pillow does): antialias must be True")
        self.size = (int(size),)
        self.crop_size = crop
        self.interpolation = interpolation
        self.antialias = True

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((resized width, height), (left, top) of the crop in the resized image)``, as torchvision computes them."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        resized = (new_short, new_long) if width <= height else (new_long, new_short)
        crop_h, crop_w = self.crop_size
        return resized, (int(round((resized[0] - crop_w) / 2.0)), int(round((resized[1] - crop_h) / 2.0)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        from torchvision.transforms.v2 import functional as F

        if not isinstance(inpt, Image.Image):
            resized = F.resize(inpt, list(self.size), interpolation=self.interpolation, antialias=True)
            return F.center_crop(resized, list(self.crop_size))
        (out_w, out_h), (left, top) = self.geometry(*inpt.size)
        crop_h, crop_w = self.crop_size
        scale_x, scale_y = inpt.width / out_w, inpt.height / out_h
        box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
        return inpt.resize((crop_w, crop_h), PIL_FILTERS[self.interpolation], box=box)


class SquareCropResize(v2.Transform):
    """The deployment geometry of a ``streetvision`` bundle: a ``size`` x ``size`` image passes whole.

    Any other image gets the challenge pipeline's level-0 geometry: the centre square of side
    ``min(w, h)``, resized to ``size`` (bilinear, antialiased). The subnet sends 224 x 224 JPEGs,
    so the deployed model sees exactly the pixels it receives, never an upsampled, cropped copy.
    """

    def __init__(self, size: int = 224) -> None:
        super().__init__()
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self.size = (int(size),)
        self.crop_size = (int(size), int(size))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        from stage1_core.data.challenge import square_crop_resize

        if not isinstance(inpt, Image.Image):
            raise TypeError(f"SquareCropResize takes a PIL image, got {type(inpt).__name__}")
        if inpt.size == self.crop_size:
            return inpt
        return square_crop_resize(inpt, self.size[0])


def build_deploy_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Preprocessing of a ``streetvision`` bundle: :class:`SquareCropResize`, then normalisation only."""
    return v2.Compose([SquareCropResize(image_size), *_to_normalised_tensor(mean, std)])


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
    ``light``: the evaluation view (Resize 256, CenterCrop) and HFlip .5, nothing else - for a
    backbone whose features are not invariant to crops and erasing (the embedded default's random
    tiny DINOv3), where the baseline's crops of the whole, wider-than-square image turn fine-tuning
    into training on another distribution than the one evaluated.
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
    elif kind == "light":
        return v2.Compose([
            ResizedCenterCrop(256, image_size),
            v2.RandomHorizontalFlip(p=0.5),
            *_to_normalised_tensor(mean, std),
        ])
    else:
        raise ValueError(f"augmentation kind {kind!r} is not supported - use one of {', '.join(AUGMENTATIONS)}")
    return v2.Compose([*geometric, *_to_normalised_tensor(mean, std), erasing])


def _check_resize(resize: int, image_size: int) -> None:
    if resize < image_size:
        raise ValueError(f"resize={resize} is smaller than image_size={image_size} - resize must be >= image_size")


def build_eval_transform(
    image_size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Deterministic evaluation preprocessing: :class:`ResizedCenterCrop` (shorter side ``resize``, bicubic)."""
    _check_resize(resize, image_size)
    return v2.Compose([ResizedCenterCrop(resize, image_size), *_to_normalised_tensor(mean, std)])


def build_reference_eval_transform(
    image_size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The two-step torchvision evaluation transform: ``v2.Resize`` (bicubic, antialiased), ``v2.CenterCrop``.

    :func:`build_eval_transform` computes the same within a stated tolerance, faster. Bundles
    exported before it record this transform; they are rebuilt with it, so their decisions stay
    exactly those that were evaluated.
    """
    _check_resize(resize, image_size)
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


class EvalPipeline:
    """The evaluation transform split where it is cheapest to move data: pixels, then a batch.

    :meth:`pixels` runs the geometric steps (:class:`ResizedCenterCrop`, or the reference Resize +
    CenterCrop) and ToImage on one PIL image and returns ``uint8 [3, crop, crop]`` (a quarter of
    the float bytes to ship from a loader worker or to a GPU); :meth:`normalise` runs
    ToDtype(float32, scale) + Normalize on a whole ``uint8`` batch, on the batch's device. Both call
    the very kernels the full transform calls, in the same order, so ``normalise(stack(pixels(x)))``
    equals ``stack(transform(x))`` bit for bit (element-wise IEEE operations do not depend on
    batching or device), and the transform text - the feature-cache key - stays the same.
    Build it with :func:`eval_pipeline`.
    """

    def __init__(self, geometry: Sequence[Any], mean: Sequence[float], std: Sequence[float]):
        self.geometry = list(geometry)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    @property
    def resize(self) -> int:
        return int(self.geometry[0].size[0])

    @property
    def crop(self) -> tuple[int, int]:
        last = self.geometry[-1]
        return tuple(int(c) for c in (last.crop_size if isinstance(last, (ResizedCenterCrop, SquareCropResize)) else last.size))

    def pixels(self, image: Any) -> torch.Tensor:
        """``uint8 [3, H, W]`` of a PIL RGB image after the geometric steps (no float work)."""
        from torchvision.transforms.v2 import functional as F

        for step in self.geometry:
            image = step(image)
        return F.pil_to_tensor(image)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 normalised ``[N, 3, H, W]`` of a ``uint8`` batch, computed on its device."""
        from torchvision.transforms.v2 import functional as F

        if batch.dtype != torch.uint8:
            raise TypeError(f"normalise expects a uint8 batch from EvalPipeline.pixels, got {batch.dtype}")
        return F.normalize(F.to_dtype(batch, torch.float32, scale=True), self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalPipeline({describe_transform(v2.Compose(self.geometry))}, mean={self.mean}, std={self.std})"


def eval_pipeline(transform: Any) -> EvalPipeline | None:
    """The :class:`EvalPipeline` equal to ``transform``, or None when it is not an evaluation transform.

    Recognised: a ``v2.Compose`` of exactly :class:`ResizedCenterCrop` or :class:`SquareCropResize` (or the reference
    Resize(one size, antialias, no max_size) + CenterCrop), ToImage, ToDtype(float32,
    scale=True), Normalize - what :func:`build_eval_transform` and
    :func:`build_reference_eval_transform` build. Anything else (training augmentation, a custom
    callable) is None: use it image by image.
    """
    if not isinstance(transform, v2.Compose):
        return None
    steps = list(transform.transforms)
    if steps and type(steps[0]) in (ResizedCenterCrop, SquareCropResize):
        geometry, rest = steps[:1], steps[1:]
    elif len(steps) >= 2 and type(steps[0]) is v2.Resize and type(steps[1]) is v2.CenterCrop:
        resize = steps[0]
        if len(resize.size) != 1 or resize.max_size is not None or resize.antialias is not True:
            return None
        geometry, rest = steps[:2], steps[2:]
    else:
        return None
    kinds = (v2.ToImage, v2.ToDtype, v2.Normalize)
    if len(rest) != len(kinds) or any(type(s) is not k for s, k in zip(rest, kinds)):
        return None
    _, to_dtype, normalize = rest
    dtype = to_dtype.dtype
    if isinstance(dtype, dict):
        dtype = dtype.get(v2.Image, dtype.get("others")) if len(dtype) else None
    if dtype is not torch.float32 or not to_dtype.scale or normalize.inplace:
        return None
    return EvalPipeline(geometry, normalize.mean, normalize.std)
