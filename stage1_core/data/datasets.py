"""Labelled image datasets in the NATIX layout: a CSV of ``image,label`` lines plus an image folder.

The reading rules keep the baseline's behaviour (optional header line, paths relative to the image
folder, absolute paths kept as they are) and add what real data needs: a UTF-8 byte-order mark and
Windows line ends are accepted, and every problem in a labels file (bad label, malformed line,
duplicate image, missing file, empty file) is reported at once, with ``file:line``, before any
training or feature extraction starts.

Undecodable images: by default an image that fails to decode raises :class:`CorruptImageError`
naming the file when it is loaded. With ``skip_corrupt=True`` every image is decoded once when the
dataset is built (a thread pool keeps that quick); the ones that fail are excluded, counted in
``statistics()`` and listed in ``dataset.skipped``, so the dataset's length never changes after
construction and sample ids stay aligned with cached features.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from stage1_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
)

NATIX_SOURCE = "natix"
"""Source name whose sample ids are the bare relative image path (no ``<source>/`` prefix)."""

HEADER_FIRST_FIELDS = frozenset({"image", "images", "image_path", "path", "file", "filename"})
HEADER_LABEL_FIELDS = frozenset({"label", "labels", "class", "target", "y"})
LABEL_HELP = "use 1 for roadwork and 0 for no roadwork"
#: EXIF orientations that flip or rotate the stored pixels (1 and anything else leave them).
EXIF_TRANSPOSING = frozenset(range(2, 9))


@dataclass(frozen=True)
class Sample:
    """One labelled image: stable id, absolute path, label (1 = roadwork), source, CSV line."""

    sample_id: str
    path: Path
    label: int
    source: str
    line: int
    #: sha256 of the image bytes when it was indexed; when set, decoding checks the bytes read.
    sha256: str | None = None


class DatasetValidationError(ValueError):
    """A labels file (or several) has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        listed = "\n  ".join(self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the labels data:\n  {listed}")


class ImageChangedError(ValueError):
    """An image's bytes are not the ones indexed: it was edited in place after ``dataset_index``."""

    def __init__(self, path: Path, expected: str, found: str) -> None:
        self.path, self.expected, self.found = Path(path), expected, found
        super().__init__(
            f"{path}: image changed since it was indexed (sha256 {found}, dataset_index recorded {expected}); "
            f"its features would be stored under the old content key. Re-materialise dataset_index (and what "
            f"depends on it), or restore the original file."
        )


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"{path}: cannot decode image ({reason}) - replace or remove the file, "
            f"or set skip_corrupt=True to exclude undecodable images"
        )


def _is_header(fields: list[str]) -> bool:
    if len(fields) < 2:
        return False
    first, label = fields[0].strip().lower(), fields[1].strip().lower()
    return label in HEADER_LABEL_FIELDS or first in HEADER_FIRST_FIELDS


def _sample_id(raw: str, resolved: Path, image_dir: Path, source: str) -> str:
    if os.path.isabs(raw):
        try:
            rel = resolved.relative_to(image_dir)
            key = rel.as_posix()
        except ValueError:
            key = resolved.as_posix()
    else:
        key = PurePosixPath(os.path.normpath(raw).replace(os.sep, "/")).as_posix()
    return key if source == NATIX_SOURCE else f"{source}/{key}"


def _parse_labels(labels_file: Path, image_dir: Path, source: str) -> tuple[list[Sample], list[str]]:
    """Parse one labels file; returns the samples and the list of problems found."""
    problems: list[str] = []
    name = str(labels_file)
    if not labels_file.is_file():
        return [], [f"{name}: labels file not found - check the labels_file path"]
    if not image_dir.is_dir():
        problems.append(f"{image_dir}: image folder not found - check the image_dir path")
    raw = labels_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], [f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}) - save the CSV as UTF-8"]
    if not text.strip():
        return [], [f"{name}: empty file - expected a header `image,label` and one `image,label` line per image"]

    samples: list[Sample] = []
    first_seen: dict[Path, int] = {}
    ids_seen: dict[str, int] = {}
    data_lines = 0
    header_seen = False
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            data_lines += 1
            problems.append(f"{name}:{reader.line_num}: unreadable CSV line ({exc}) - fix the quoting of this line")
            continue
        lineno = reader.line_num
        fields = [f.strip() for f in row]
        if not any(fields):
            continue
        if not header_seen and data_lines == 0 and _is_header(fields):
            header_seen = True
            continue
        data_lines += 1
        where = f"{name}:{lineno}"
        if len(fields) != 2 or not fields[0]:
            problems.append(
                f"{where}: malformed line {','.join(row)!r} (expected 2 fields `image,label`, got "
                f"{len(fields)}{' with an empty image path' if len(fields) == 2 else ''}) - "
                f"write one `image,label` pair per line"
            )
            continue
        image, label_text = fields
        if label_text not in ("0", "1"):
            problems.append(f"{where}: label {label_text!r} for {image!r} is not 0 or 1 - {LABEL_HELP}")
            continue
        resolved = Path(os.path.normpath(image_dir / image)) if not os.path.isabs(image) else Path(
            os.path.normpath(image)
        )
        if resolved in first_seen:
            problems.append(
                f"{where}: duplicate image {image!r} (already listed at line {first_seen[resolved]}) - "
                f"keep one line per image"
            )
            continue
        first_seen[resolved] = lineno
        if not resolved.is_file():
            problems.append(f"{where}: image file not found: {resolved} - fix the path or the image_dir")
            continue
        sample_id = _sample_id(image, resolved, image_dir, source)
        if sample_id in ids_seen:
            problems.append(
                f"{where}: image {image!r} maps to sample id {sample_id!r} already used at line "
                f"{ids_seen[sample_id]} - give each image a distinct path"
            )
            continue
        ids_seen[sample_id] = lineno
        samples.append(Sample(sample_id, resolved, int(label_text), source, lineno))
    if data_lines == 0:
        problems.append(f"{name}: header only, no samples - add one `image,label` line per image")
    return samples, problems


def read_labels_csv(labels_file: str | Path, image_dir: str | Path, source: str = NATIX_SOURCE) -> list[Sample]:
    """Read and validate a labels CSV; raise :class:`DatasetValidationError` listing every problem.

    The first non-empty line is a header when its fields look like ``image,label``. Relative
    image paths are joined to ``image_dir``, absolute paths are kept. Sample ids are the CSV's
    relative path in posix form, prefixed with ``"<source>/"`` unless ``source`` is ``"natix"``,
    so they are the same on every machine (an absolute path outside ``image_dir`` is its own id).
    """
    samples, problems = _parse_labels(Path(labels_file), Path(image_dir).absolute(), source)
    if problems:
        raise DatasetValidationError(problems)
    return samples


def read_sources(dataset_configs: Iterable[Mapping[str, Any] | Sequence[Any]]) -> list[Sample]:
    """Read several ``(source, image_dir, labels_file)`` configs, reporting all problems together."""
    samples: list[Sample] = []
    problems: list[str] = []
    sources_seen: set[str] = set()
    ids_seen: dict[str, str] = {}
    for index, config in enumerate(dataset_configs):
        try:
            source, image_dir, labels_file = _normalise_config(config)
        except ValueError as exc:
            problems.append(f"dataset_configs[{index}]: {exc}")
            continue
        if source in sources_seen:
            problems.append(f"dataset_configs[{index}]: source {source!r} listed twice - give each source a distinct name")
            continue
        sources_seen.add(source)
        found, found_problems = _parse_labels(Path(labels_file), Path(image_dir).absolute(), source)
        problems.extend(found_problems)
        for sample in found:
            if sample.sample_id in ids_seen:
                problems.append(
                    f"{labels_file}:{sample.line}: sample id {sample.sample_id!r} also comes from source "
                    f"{ids_seen[sample.sample_id]!r} - rename one of the sources"
                )
                continue
            ids_seen[sample.sample_id] = source
            samples.append(sample)
    if problems:
        raise DatasetValidationError(problems)
    return samples


def _normalise_config(config: Mapping[str, Any] | Sequence[Any]) -> tuple[str, str, str]:
    if isinstance(config, Mapping):
        source = config.get("source", config.get("name"))
        missing = [k for k, v in (("source (or name)", source), ("image_dir", config.get("image_dir")),
                                   ("labels_file", config.get("labels_file"))) if not v]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} - each entry needs source, image_dir, labels_file")
        return str(source), str(config["image_dir"]), str(config["labels_file"])
    if isinstance(config, Sequence) and not isinstance(config, str) and len(config) == 3:
        source, image_dir, labels_file = config
        return str(source), str(image_dir), str(labels_file)
    raise ValueError(
        f"unsupported entry {config!r} - use a dict with source/image_dir/labels_file "
        f"or a (source, image_dir, labels_file) tuple"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy of ``image`` whatever its mode (CMYK, grayscale, 16-bit, palette, alpha).

    EXIF orientation is applied. Transparent pixels are composited onto white, so a palette PNG
    with a transparent colour does not show its arbitrary hidden palette entry. An RGB image
    without a rotating EXIF orientation is returned as it is (no copy): nothing here or in the
    transforms modifies an image in place.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) in EXIF_TRANSPOSING:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = float(array.max()) if array.size else 0.0
        if high > 65535.0:
            array = array * (255.0 / high)
        elif high > 255.0:
            array = array / 257.0  # 16-bit range to 8 bits
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info) or (
        image.mode in ("L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, expected_sha256: str | None = None) -> Image.Image:
    """Decode ``path`` fully and return it as RGB; raise :class:`CorruptImageError` if it cannot.

    The bytes are read once and decoded from memory, so with ``expected_sha256`` (the hash the
    dataset index recorded) the very bytes decoded are checked: :class:`ImageChangedError` when
    the file was edited after indexing.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptImageError(Path(path), str(exc) or type(exc).__name__) from exc
    if expected_sha256 is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != expected_sha256:
            raise ImageChangedError(Path(path), expected_sha256, found)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(Path(path), str(exc) or type(exc).__name__) from exc


def find_corrupt_images(samples: Sequence[Sample], num_threads: int | None = None) -> dict[str, str]:
    """Decode every sample once; return ``{sample_id: reason}`` for those that fail."""

    def check(sample: Sample) -> tuple[str, str | None]:
        try:
            load_rgb(sample.path)
        except CorruptImageError as exc:
            return sample.sample_id, exc.reason
        return sample.sample_id, None

    threads = num_threads or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return {sid: reason for sid, reason in pool.map(check, samples) if reason is not None}


def _normalisation(processor: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = getattr(processor, "image_mean", None) if processor is not None else None
    std = getattr(processor, "image_std", None) if processor is not None else None
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class LabelledImageDataset(Dataset):
    """Map-style dataset over validated :class:`Sample` s returning ``(pixel_values, label)``.

    ``transform`` (a callable taking a PIL RGB image and returning a normalised tensor) overrides
    the default: :func:`build_train_transform` (``augmentation`` kind) when ``augment`` else
    :func:`build_eval_transform`, normalised with the processor's mean/std when it has them and
    ImageNet's otherwise.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processor: Any = None,
        augment: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        skip_corrupt: bool = False,
        augmentation: str = "moderate",
    ) -> None:
        self.processor = processor
        self.augment = augment
        self.skip_corrupt = skip_corrupt
        mean, std = _normalisation(processor)
        if transform is None:
            transform = (
                build_train_transform(augmentation, mean=mean, std=std) if augment else build_eval_transform(mean=mean, std=std)
            )
        self.transform = transform
        self.skipped: dict[str, str] = {}
        samples = list(samples)
        self.declared_samples: list[Sample] = samples
        if skip_corrupt:
            self.skipped = find_corrupt_images(samples)
            samples = [s for s in samples if s.sample_id not in self.skipped]
        self.samples: list[Sample] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path, sample.sha256)), sample.label

    def eval_pixels(self) -> tuple["PixelDataset", Any] | None:
        """``(dataset of (uint8 pixels, label), EvalPipeline)`` when the transform is the evaluation one.

        The loader workers then decode, resize and crop only, and ship ``uint8`` (a quarter of
        the float bytes); the consumer normalises each batch with ``pipeline.normalise`` on its
        device. The result equals this dataset's own output bit for bit. None for any other
        transform (training augmentation, a custom callable).
        """
        from stage1_core.data.transforms import eval_pipeline

        pipeline = eval_pipeline(self.transform)
        return None if pipeline is None else (PixelDataset(self.samples, pipeline), pipeline)

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def sources(self) -> list[str]:
        return [s.source for s in self.samples]

    def statistics(self) -> dict[str, dict[str, int]]:
        """Per source: ``total``, ``roadwork`` (label 1), ``no_roadwork`` (label 0), ``skipped_corrupt``."""
        stats: dict[str, dict[str, int]] = {}
        counts = Counter((s.source, s.label) for s in self.samples)
        skipped_by_source = Counter(s.source for s in self.declared_samples if s.sample_id in self.skipped)
        for source in dict.fromkeys(s.source for s in self.declared_samples):
            positives, negatives = counts[(source, 1)], counts[(source, 0)]
            stats[source] = {
                "total": positives + negatives,
                "roadwork": positives,
                "no_roadwork": negatives,
                "skipped_corrupt": skipped_by_source[source],
            }
        return stats


class PixelDataset(Dataset):
    """``(uint8 [3, H, W] pixels, label)`` per sample: decode, EXIF/mode handling, resize and crop.

    See :meth:`LabelledImageDataset.eval_pixels`; ``pipeline.normalise`` finishes a batch.
    """

    def __init__(self, samples: Sequence[Sample], pipeline: Any) -> None:
        self.samples = list(samples)
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.pipeline.pixels(load_rgb(sample.path, sample.sha256)), sample.label

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]


class NATIXDataset(LabelledImageDataset):
    """The NATIX layout: one image folder and one ``image,label`` CSV (source ``"natix"``)."""

    def __init__(
        self,
        image_dir: str | Path,
        labels_file: str | Path,
        processor: Any = None,
        augment: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        skip_corrupt: bool = False,
        augmentation: str = "moderate",
        source: str = NATIX_SOURCE,
    ) -> None:
        declared = read_labels_csv(labels_file, image_dir, source)
        self.image_dir = Path(image_dir)
        self.labels_file = Path(labels_file)
        super().__init__(declared, processor, augment, transform, skip_corrupt, augmentation)


class MultiRoadworkDataset(LabelledImageDataset):
    """Several sources (NATIX plus extra roadwork sets) read as one dataset, source kept per sample.

    ``dataset_configs``: dicts with ``source`` (or ``name``), ``image_dir``, ``labels_file``, or
    ``(source, image_dir, labels_file)`` tuples. Problems in all sources are reported together.
    """

    def __init__(
        self,
        dataset_configs: Iterable[Mapping[str, Any] | Sequence[Any]],
        processor: Any = None,
        augment: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        skip_corrupt: bool = False,
        augmentation: str = "moderate",
    ) -> None:
        declared = read_sources(dataset_configs)
        super().__init__(declared, processor, augment, transform, skip_corrupt, augmentation)
