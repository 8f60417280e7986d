"""The StreetVision challenge pipeline: what a miner's bundle receives from the subnet's validators.

Written from the facts of ``METHODS.md`` section 8 (the subnet's validator, tag v0.2.4). Each
challenge draws a level 0-3 with probability 0.25 each:

- level 0: centre square crop of side ``min(w, h)``, resize to 224 (bilinear, antialiased);
- level 1: rotation by an angle uniform in [-20, 20] degrees (nearest, no expand, black fill) of
  the whole image as a float tensor, then a random square crop whose area is a fraction uniform in
  [0.2, 1] of the rotated image (torchvision's RandomResizedCrop sampling: ten tries, then the
  centre square), resized to 224 (bilinear, antialiased);
- level 2: level 1, then CS, CC and "JPEG" each at a distortion level drawn from {0, 1};
- level 3: level 1, then CS, CC, "JPEG", GNC and GB each at a level drawn from {0, 1, 2}.

Distortions run on ``uint8`` arrays (the float tensor * 255, truncated) and return to a float
tensor (``/ 255``): CS keeps luma and scales chroma by 0.4 / 0.3 (``Y + s (c - Y)`` per channel,
which is what scaling Cb and Cr in YCbCr does), CC multiplies every channel by 0.85 / 0.725, "JPEG"
resizes down by 2 / 3 and back up (bilinear, half-pixel centres, no antialiasing: a resampling, not
a codec), GNC adds Gaussian noise of variance 0.001 / 0.002 in the validator's scaled YCbCr space
(a luma standard deviation of ``sqrt(v) * 255 * 255 / 219`` and a chroma one of
``sqrt(v) * 255 * 255 / 224`` in pixel units), GB blurs with a Gaussian kernel 7 / 9 of sigma
``kernel / 6`` (reflect-101 borders). Every level ends as the validator ends: ``tensor * 255``
truncated to bytes, a JPEG at quality 75, which the miner decodes.

Implemented with numpy, Pillow and ``torchvision.transforms.v2.functional`` (OpenCV is not a
dependency): the bilinear down/up-scaling and the blur may differ from OpenCV's fixed-point
arithmetic by one grey level on some pixels; the semantics (sizes, parameters, order) are the
validator's.

Draws are deterministic per ``(seed, image content sha256, view index, level request)``
(:func:`view_rng`), so they do not depend on worker count or order. :data:`PIPELINE_ID` carries a
version: any change of behaviour must bump :data:`PIPELINE_VERSION`, which changes every feature
key, lineage id and bundle that depends on the pipeline.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

PIPELINE_NAME = "streetvision"
PIPELINE_VERSION = 1
PIPELINE_ID = f"{PIPELINE_NAME}-v{PIPELINE_VERSION}"
#: ``deploy_pipeline`` values the config accepts.
DEPLOY_PIPELINES = ("none", PIPELINE_NAME)

TARGET_SIZE = 224
JPEG_QUALITY = 75
LEVELS = (0, 1, 2, 3)
LEVEL_PROBABILITIES = (0.25, 0.25, 0.25, 0.25)
MAX_ROTATION_DEGREES = 20.0
CROP_SCALE = (0.2, 1.0)
#: Parameter of each distortion at distortion levels 1 and 2 (level 0 leaves the image alone).
DISTORTION_PARAMETERS: dict[str, tuple[float, float]] = {
    "CS": (0.4, 0.3),
    "CC": (0.85, 0.725),
    "JPEG": (2, 3),
    "GNC": (0.001, 0.002),
    "GB": (7, 9),
}
#: Distortions of each challenge level, in the order they run, with the highest distortion level drawn.
LEVEL_DISTORTIONS: dict[int, tuple[tuple[str, int], ...]] = {
    0: (),
    1: (),
    2: (("CS", 1), ("CC", 1), ("JPEG", 1)),
    3: (("CS", 2), ("CC", 2), ("JPEG", 2), ("GNC", 2), ("GB", 2)),
}


@dataclass(frozen=True)
class ChallengeDraw:
    """The random choices of one challenge: level, rotation, crop box and distortion levels.

    ``crop`` is ``(top, left, height, width)`` in the (rotated) source image; ``distortions``
    lists ``(name, distortion level)`` in the order they run (level 0 = not applied).
    """

    level: int
    angle: float | None = None
    crop: tuple[int, int, int, int] | None = None
    distortions: tuple[tuple[str, int], ...] = ()
    noise_seed: int | None = None
    source_size: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["distortions"] = [list(d) for d in self.distortions]
        return out


def view_rng(seed: int, content_sha256: str, view: int, level: int | None = None) -> np.random.Generator:
    """The random stream of one view of one image: a hash of pipeline id, seed, content, view and level.

    ``level=None`` is the mixture (the level is drawn); a forced level gets its own stream.
    """
    key = f"{PIPELINE_ID}|seed={int(seed)}|sha256={content_sha256}|view={int(view)}|level={'mix' if level is None else int(level)}"
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32).tolist())


def random_square_crop(rng: np.random.Generator, width: int, height: int,
                       scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """``(top, left, side, side)``: torchvision's RandomResizedCrop sampling with ratio (1, 1).

    Ten tries of an area fraction uniform in ``scale``; a square that fits is placed uniformly.
    When none fits, the centre square of side ``min(width, height)`` (torchvision's fallback).
    """
    area = width * height
    for _ in range(10):
        side = int(round(math.sqrt(area * rng.uniform(*scale))))
        if 0 < side <= width and 0 < side <= height:
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            return top, left, side, side
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def draw_challenge(rng: np.random.Generator, width: int, height: int, level: int | None = None) -> ChallengeDraw:
    """Draw one challenge for a ``width`` x ``height`` image (``level`` forces the level)."""
    if level is None:
        level = int(rng.choice(LEVELS, p=LEVEL_PROBABILITIES))
    if level not in LEVELS:
        raise ValueError(f"challenge level {level!r} is not one of {LEVELS}")
    if level == 0:
        return ChallengeDraw(level=0, source_size=(width, height))
    angle = float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    crop = random_square_crop(rng, width, height)
    distortions = tuple((name, int(rng.integers(0, top + 1))) for name, top in LEVEL_DISTORTIONS[level])
    noise_seed = int(rng.integers(0, 2**63 - 1)) if any(n == "GNC" and d > 0 for n, d in distortions) else None
    return ChallengeDraw(level=level, angle=angle, crop=crop, distortions=distortions, noise_seed=noise_seed,
                         source_size=(width, height))


# ----- distortions on uint8 H x W x 3 RGB arrays ----------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _truncate(values: np.ndarray) -> np.ndarray:
    """Float to uint8 as numpy's ``astype(uint8)`` after clipping to [0, 255] (truncation)."""
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


def colour_saturation(pixels: np.ndarray, factor: float) -> np.ndarray:
    """CS: luma kept, chroma scaled by ``factor`` (each channel moves to ``Y + factor (c - Y)``)."""
    x = pixels.astype(np.float32)
    luma = x @ _LUMA
    return _truncate(luma[..., None] + float(factor) * (x - luma[..., None]))


def colour_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    """CC: every channel multiplied by ``factor``, truncated."""
    return _truncate(pixels.astype(np.float32) * float(factor))


def _bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``(height, width)`` with half-pixel centres and no antialiasing, rounded."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def down_up_scale(pixels: np.ndarray, factor: int) -> np.ndarray:
    """The validator's "JPEG": resize down to ``(h // factor, w // factor)`` and back (bilinear)."""
    height, width = pixels.shape[:2]
    small = _bilinear(pixels, (max(1, height // int(factor)), max(1, width // int(factor))))
    return _bilinear(small, (height, width))


_YCC_SCALE = (255.0 * 255.0 / 219.0, 255.0 * 255.0 / 224.0)


def gaussian_noise_colour(pixels: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    """GNC: Gaussian noise of ``variance`` in the validator's scaled YCbCr space, clipped and truncated."""
    x = pixels.astype(np.float32)
    luma = x @ _LUMA
    cr = (x[..., 0] - luma) * np.float32(0.713)
    cb = (x[..., 2] - luma) * np.float32(0.564)
    std = math.sqrt(float(variance))
    noise = rng.standard_normal((3, *luma.shape), dtype=np.float32)
    luma += np.float32(std * _YCC_SCALE[0]) * noise[0]
    cb += np.float32(std * _YCC_SCALE[1]) * noise[1]
    cr += np.float32(std * _YCC_SCALE[1]) * noise[2]
    rgb = np.stack([luma + 1.403 * cr, luma - 0.714 * cr - 0.344 * cb, luma + 1.773 * cb], axis=-1)
    return _truncate(rgb)


def gaussian_blur(pixels: np.ndarray, kernel: int) -> np.ndarray:
    """GB: Gaussian blur with a ``kernel`` x ``kernel`` kernel of sigma ``kernel / 6`` (reflect-101 borders)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
    out = F.gaussian_blur(tensor, [int(kernel), int(kernel)], [kernel / 6.0, kernel / 6.0])
    return out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def apply_distortion(pixels: np.ndarray, name: str, distortion_level: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One named distortion at ``distortion_level`` (0: unchanged) on a uint8 RGB array."""
    if distortion_level == 0:
        return pixels
    param = DISTORTION_PARAMETERS[name][distortion_level - 1]
    if name == "CS":
        return colour_saturation(pixels, param)
    if name == "CC":
        return colour_contrast(pixels, param)
    if name == "JPEG":
        return down_up_scale(pixels, int(param))
    if name == "GNC":
        if rng is None:
            raise ValueError("GNC needs a random generator")
        return gaussian_noise_colour(pixels, param, rng)
    if name == "GB":
        return gaussian_blur(pixels, int(param))
    raise ValueError(f"unknown distortion {name!r}; known: {sorted(DISTORTION_PARAMETERS)}")


# ----- the whole challenge ---------------------------------------------------------------------

def square_crop_resize(image: Image.Image, size: int = TARGET_SIZE) -> Image.Image:
    """Level 0's geometry: centre square of side ``min(w, h)`` (torchvision's offsets), resized to ``size``."""
    image = image.convert("RGB")
    side = min(image.size)
    left = int(round((image.width - side) / 2.0))
    top = int(round((image.height - side) / 2.0))
    square = image.crop((left, top, left + side, top + side))
    return square if side == size else square.resize((size, size), Image.Resampling.BILINEAR)


def _to_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Float [3, H, W] in [0, 1] -> uint8 H x W x 3 as the validator does it (``* 255``, truncated)."""
    return tensor.mul(255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def apply_challenge(image: Image.Image, draw: ChallengeDraw) -> Image.Image:
    """The challenge of ``draw`` on ``image`` before the final JPEG: a 224 x 224 RGB image."""
    image = image.convert("RGB")
    if draw.level == 0:
        tensor = F.to_dtype(F.pil_to_tensor(square_crop_resize(image)), torch.float32, scale=True)
        return Image.fromarray(_to_bytes(tensor))
    tensor = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    tensor = F.rotate(tensor, draw.angle, interpolation=F.InterpolationMode.NEAREST, expand=False, fill=0.0)
    top, left, height, width = draw.crop
    tensor = F.resized_crop(tensor, top, left, height, width, [TARGET_SIZE, TARGET_SIZE],
                            interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if draw.distortions:
        noise = np.random.default_rng(draw.noise_seed) if draw.noise_seed is not None else None
        pixels = _to_bytes(tensor)
        for name, distortion_level in draw.distortions:
            pixels = apply_distortion(pixels, name, distortion_level, noise)
        tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
    return Image.fromarray(_to_bytes(tensor))


def jpeg_round_trip(image: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """Encode as JPEG at ``quality`` and decode: what the miner receives."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def challenge_view(image: Image.Image, seed: int, content_sha256: str, view: int = 0,
                   level: int | None = None) -> tuple[Image.Image, ChallengeDraw]:
    """One deterministic challenge of ``image`` as the miner receives it (decoded 224 x 224 JPEG) and its draw."""
    image = image.convert("RGB")
    draw = draw_challenge(view_rng(seed, content_sha256, view, level), image.width, image.height, level)
    return jpeg_round_trip(apply_challenge(image, draw)), draw


def describe_pipeline(seed: int, views: Sequence[int] | int, level: int | None = None) -> str:
    """Stable text of a set of challenge views (part of feature keys and lineage ids)."""
    views = [int(views)] if isinstance(views, int) else [int(v) for v in views]
    return (f"{PIPELINE_ID}(seed={int(seed)}, views={views}, level={'mix' if level is None else int(level)}, "
            f"levels={list(LEVELS)}, p={list(LEVEL_PROBABILITIES)}, jpeg_quality={JPEG_QUALITY})")
