"""Unlabeled target-domain images for ExPLoRA pre-training.

:func:`unlabeled_images` gathers the image paths (the training split plus an optional folder of
extra unlabeled images) and refuses any path of the validation splits: pre-training on a val
image, even without its label, would leak it into the backbone that val later certifies.
:class:`UnlabeledImageDataset` decodes an image and returns the transformed tensor only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from stage1_core.data.datasets import load_rgb
from stage1_core.data.transforms import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

__all__ = [
    "IMAGE_SUFFIXES",
    "ForbiddenImageError",
    "UnlabeledImageDataset",
    "build_pretrain_eval_transform",
    "build_pretrain_transform",
    "split_held_out",
    "unlabeled_images",
]


class ForbiddenImageError(ValueError):
    """An image selected for pre-training belongs to a forbidden (validation) split."""


def _key(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _scan(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"extra_dir {directory} is not a directory")
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def unlabeled_images(
    train_paths: Iterable[str | Path],
    extra_dir: str | Path | None = None,
    forbidden: Collection[str | Path] = (),
) -> list[Path]:
    """Resolved, de-duplicated image paths for pre-training (train order first, then ``extra_dir``).

    Paths are compared after ``resolve()``, so a val image reached through a relative path or a
    symlink is still caught. Any overlap with ``forbidden`` raises :class:`ForbiddenImageError`
    naming how many and which images - nothing is silently dropped; a missing file raises
    ``FileNotFoundError``.
    """
    candidates = [_key(p) for p in train_paths]
    if extra_dir is not None:
        candidates.extend(_key(p) for p in _scan(_key(extra_dir)))
    blocked = {_key(p) for p in forbidden}
    leaked = [p for p in candidates if p in blocked]
    if leaked:
        shown = ", ".join(str(p) for p in leaked[:5])
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise ForbiddenImageError(
            f"{len(leaked)} image(s) selected for ExPLoRA pre-training belong to a validation split: "
            f"{shown}{more}. Pre-train on train images (and extra unlabeled images) only."
        )
    unique = list(dict.fromkeys(candidates))
    missing = [p for p in unique if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} pre-training image(s) do not exist, e.g. {missing[0]}")
    if not unique:
        raise ValueError("no images for pre-training: train_paths is empty and extra_dir holds no images")
    return unique


def split_held_out(paths: Sequence[Path], n_held_out: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """A fixed ``(train, held_out)`` split of ``paths``; the held-out images are not pre-trained on."""
    if not 0 <= n_held_out < len(paths):
        raise ValueError(f"n_held_out={n_held_out} must be in [0, {len(paths)}) for {len(paths)} images")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_held_out])
    return [p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held]


def build_pretrain_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """MAE-style pre-training augmentation: RandomResizedCrop(image_size, scale .2-1, bicubic) + HFlip."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=scale, interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def build_pretrain_eval_transform(image_size: int = 224) -> v2.Compose:
    """Deterministic view for held-out losses: the evaluation recipe, resize in the 256/224 ratio."""
    return build_eval_transform(image_size=image_size, resize=round(image_size * 256 / 224))


class UnlabeledImageDataset(Dataset):
    """Images at ``paths`` as normalised ``[3, H, W]`` tensors (no labels)."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable | None = None, image_size: int = 224) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform if transform is not None else build_pretrain_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[index]))
