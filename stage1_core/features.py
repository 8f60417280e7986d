"""Feature cache: CLS features of a frozen backbone per split, with a manifest that says what they are.

A cache directory holds, per split, ``<split>_features.pt`` (float32 ``[N, hidden]``) and
``<split>_labels.pt`` (int64 ``[N]``) - the baseline script's file names, plain tensors saved with
``torch.save`` and read with ``torch.load(weights_only=True)`` - plus ``manifest.json``::

    {"format": "stage1-feature-cache", "format_version": 1, "key": ...,
     "backbone_fingerprint": <sha256 of backbone config + weights>, "backbone": {...},
     "transform": <describe_transform text>, "hidden_size": 192, "dtype": "float32",
     "created_at": ..., "source": "extracted" | "legacy-import",
     "splits": {"train": {"num_samples": N, "sample_ids": [...], "label_counts": {"0": .., "1": ..},
                          "features_file": "train_features.pt", "features_sha256": ..., ...}, ...}}

A split is reused - zero forward passes - when the manifest records the same backbone
fingerprint, the same transform text and the same sample ids in the same order, and its files
still have the recorded sha256. :func:`cache_key` hashes exactly those inputs, so a
content-addressed store (``<artifacts>/feature_store/<key>``) lets phases that share a backbone
share features.

Importing the old script's cache (:func:`import_legacy_cache`): the old script wrote
``train_*.pt`` and ``val_*.pt`` in the row order of its label CSVs (header skipped, no shuffling),
without ids. The importer therefore needs the sample ids of each split in that CSV order - e.g.
``[s.sample_id for s in read_labels_csv(val_labels_file, val_image_dir)]`` - and checks the
stored labels against the CSV labels row by row, which catches a CSV edited since extraction.
It also needs the fingerprint of the backbone that made the features (load the same
``model_path``) and the transform text (the old script's evaluation preprocessing is
torchvision's Resize(256, bicubic) + CenterCrop(224) + ImageNet normalisation, i.e.
``describe_transform(build_reference_eval_transform())``); neither can be checked from the files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stage1_core.artifacts import ArtifactError, atomic_write_bytes, read_json, sha256_file, write_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "stage1-feature-cache"
CACHE_FORMAT_VERSION = 1
LEGACY_SPLITS = ("train", "val")
#: Decode images for the evaluation transform in threads of this process (True) or in
#: DataLoader worker processes (False); see :class:`~stage1_core.data.loaders.ThreadBatches`.
THREADED_DECODING = True


class FeatureCacheError(ArtifactError):
    """A feature cache is missing, inconsistent or does not match what was asked for."""


def features_file(split: str) -> str:
    return f"{split}_features.pt"


def labels_file(split: str) -> str:
    return f"{split}_labels.pt"


@dataclass(frozen=True)
class TensorSplit:
    """One split held in memory: features ``[N, hidden]`` float, labels ``[N]`` int64, optional ids."""

    features: torch.Tensor
    labels: torch.Tensor
    sample_ids: tuple[str, ...] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        where = f"split {self.name!r}: " if self.name else ""
        if self.features.ndim != 2:
            raise ValueError(f"{where}features must be [N, hidden], got shape {tuple(self.features.shape)}")
        if not self.features.is_floating_point():
            raise ValueError(f"{where}features must be floating point, got {self.features.dtype}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"{where}labels must be [N] with N = {self.features.shape[0]} rows of features, "
                f"got shape {tuple(self.labels.shape)}"
            )
        if self.labels.dtype != torch.int64:
            object.__setattr__(self, "labels", self.labels.long())
        if self.sample_ids is not None:
            ids = tuple(self.sample_ids)
            if len(ids) != self.features.shape[0]:
                raise ValueError(f"{where}{len(ids)} sample ids for {self.features.shape[0]} rows of features")
            object.__setattr__(self, "sample_ids", ids)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.features.shape[1])

    def take(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> "TensorSplit":
        """Rows ``indices`` as a new split."""
        index = torch.as_tensor(indices, dtype=torch.long)
        ids = tuple(self.sample_ids[i] for i in index.tolist()) if self.sample_ids is not None else None
        return TensorSplit(self.features[index], self.labels[index], ids, name if name is not None else self.name)

    def subset(self, sample_ids: Sequence[str], name: str | None = None) -> "TensorSplit":
        """The rows of ``sample_ids``, in that order (every id must be present)."""
        if self.sample_ids is None:
            raise FeatureCacheError(f"split {self.name!r} has no sample ids, so it cannot be subset by id")
        position = {sid: i for i, sid in enumerate(self.sample_ids)}
        missing = [sid for sid in sample_ids if sid not in position]
        if missing:
            raise FeatureCacheError(
                f"{len(missing)} sample id(s) are not in split {self.name!r} (first: {missing[:5]}) - "
                f"the cache was made for other data; extract features again"
            )
        return self.take([position[sid] for sid in sample_ids], name)


@dataclass
class CacheManifest:
    """What a cache directory holds (``manifest.json``) plus, for the call that produced it,
    ``forward_passes`` (backbone batches run) and ``reused_splits`` (not written to disk)."""

    directory: Path
    key: str
    backbone_fingerprint: str
    transform: str
    hidden_size: int
    dtype: str
    created_at: str
    source: str
    splits: dict[str, dict[str, Any]]
    backbone: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0
    reused_splits: tuple[str, ...] = ()

    def sample_ids(self, split: str) -> list[str]:
        return list(self.splits[split]["sample_ids"])

    def sample_ids_per_split(self) -> dict[str, list[str]]:
        return {name: list(entry["sample_ids"]) for name, entry in self.splits.items()}

    def to_document(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "key": self.key,
            "backbone_fingerprint": self.backbone_fingerprint,
            "backbone": self.backbone,
            "transform": self.transform,
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "created_at": self.created_at,
            "source": self.source,
            "splits": self.splits,
        }

    @classmethod
    def from_document(cls, directory: Path, doc: Mapping[str, Any]) -> "CacheManifest":
        path = directory / MANIFEST_NAME
        if not isinstance(doc, Mapping) or doc.get("format") != CACHE_FORMAT:
            raise FeatureCacheError(f"{path}: not a feature-cache manifest ($.format != {CACHE_FORMAT!r})")
        if doc.get("format_version") != CACHE_FORMAT_VERSION:
            raise FeatureCacheError(
                f"{path}: $.format_version={doc.get('format_version')!r} is not supported "
                f"(expected {CACHE_FORMAT_VERSION}); extract the features again"
            )
        required = ("key", "backbone_fingerprint", "transform", "hidden_size", "dtype", "created_at", "source", "splits")
        missing = [f"$.{k}" for k in required if k not in doc]
        if missing:
            raise FeatureCacheError(f"{path}: manifest lacks {missing}")
        for name, entry in doc["splits"].items():
            need = ("num_samples", "sample_ids", "features_file", "labels_file", "features_sha256", "labels_sha256")
            lacking = [f"$.splits.{name}.{k}" for k in need if k not in entry]
            if lacking:
                raise FeatureCacheError(f"{path}: manifest lacks {lacking}")
            if len(entry["sample_ids"]) != entry["num_samples"]:
                raise FeatureCacheError(
                    f"{path}: $.splits.{name}: {len(entry['sample_ids'])} sample ids but num_samples={entry['num_samples']}"
                )
        return cls(
            directory=directory,
            key=str(doc["key"]),
            backbone_fingerprint=str(doc["backbone_fingerprint"]),
            transform=str(doc["transform"]),
            hidden_size=int(doc["hidden_size"]),
            dtype=str(doc["dtype"]),
            created_at=str(doc["created_at"]),
            source=str(doc["source"]),
            splits={name: dict(entry) for name, entry in doc["splits"].items()},
            backbone=dict(doc.get("backbone") or {}),
        )


def cache_key(fingerprint: str, transform_desc: str, sample_ids_per_split: Mapping[str, Sequence[str]]) -> str:
    """Content address of a cache: sha256 of fingerprint, transform text and ids per split (24 hex)."""
    payload = json.dumps(
        {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "transform": transform_desc,
            "splits": {name: list(ids) for name, ids in sorted(sample_ids_per_split.items())},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    """Read and check ``manifest.json`` of ``cache_dir``."""
    directory = Path(cache_dir)
    try:
        doc = read_json(directory / MANIFEST_NAME)
    except ArtifactError as exc:
        raise FeatureCacheError(str(exc)) from exc
    return CacheManifest.from_document(directory, doc)


def _split_file_problems(directory: Path, entry: Mapping[str, Any]) -> list[str]:
    """Each file of a split that is missing or whose sha256 differs from the manifest, named."""
    problems = []
    for file_key, sha_key in (("features_file", "features_sha256"), ("labels_file", "labels_sha256")):
        if entry[file_key] is None:
            continue
        path = directory / entry[file_key]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256_file(path) != entry[sha_key]:
            problems.append(f"{path} is corrupt or changed since extraction (sha256 differs from {MANIFEST_NAME})")
    return problems


def _split_files_ok(directory: Path, entry: Mapping[str, Any]) -> bool:
    return not _split_file_problems(directory, entry)


def _reusable(manifest: CacheManifest | None, split: str, ids: Sequence[str]) -> bool:
    if manifest is None or split not in manifest.splits:
        return False
    entry = manifest.splits[split]
    return list(entry["sample_ids"]) == list(ids) and _split_files_ok(manifest.directory, entry)


def _try_manifest(cache_dir: Path) -> CacheManifest | None:
    if not (cache_dir / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(cache_dir)
    except FeatureCacheError as exc:
        logger.warning("ignoring unusable feature cache manifest: %s", exc)
        return None


def cache_is_valid(
    out_dir: str | Path,
    fingerprint: str,
    sample_ids_per_split: Mapping[str, Sequence[str]],
    transform_desc: str,
) -> bool:
    """True when ``out_dir`` holds every requested split for this backbone, transform and ids."""
    manifest = _try_manifest(Path(out_dir))
    if manifest is None or manifest.backbone_fingerprint != fingerprint or manifest.transform != transform_desc:
        return False
    return all(_reusable(manifest, split, ids) for split, ids in sample_ids_per_split.items())


def _save_tensor(path: Path, tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def split_entry(
    split: str, ids: Sequence[str], features: torch.Tensor, labels: torch.Tensor | None, directory: Path
) -> dict[str, Any]:
    """Write one split's tensors; ``labels=None`` stores features only (labels live elsewhere)."""
    features_sha = _save_tensor(directory / features_file(split), features)
    entry: dict[str, Any] = {
        "num_samples": int(features.shape[0]),
        "sample_ids": list(ids),
        "label_counts": None,
        "features_file": features_file(split),
        "labels_file": None,
        "features_sha256": features_sha,
        "labels_sha256": None,
    }
    if labels is not None:
        counts = torch.bincount(labels, minlength=2).tolist() if labels.numel() else [0, 0]
        entry.update(label_counts={str(c): int(n) for c, n in enumerate(counts)}, labels_file=labels_file(split),
                     labels_sha256=_save_tensor(directory / labels_file(split), labels))
    return entry


def _key_of(
    fingerprint: str, transform_desc: str, entries: Mapping[str, Mapping[str, Any]], requested: Mapping[str, Sequence[str]]
) -> str:
    ids = {name: list(entry["sample_ids"]) for name, entry in entries.items()}
    ids.update({name: list(v) for name, v in requested.items()})
    return cache_key(fingerprint, transform_desc, ids)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _write_manifest(manifest: CacheManifest) -> None:
    write_json(manifest.directory / MANIFEST_NAME, manifest.to_document())


def _dataset_ids(split: str, dataset: Dataset, sample_ids: Mapping[str, Sequence[str]] | None) -> list[str]:
    if sample_ids is not None and split in sample_ids:
        ids = list(sample_ids[split])
    elif hasattr(dataset, "sample_ids"):
        ids = list(dataset.sample_ids)  # type: ignore[attr-defined]
    else:
        raise FeatureCacheError(f"split {split!r}: no sample ids given and the dataset has no .sample_ids")
    if len(ids) != len(dataset):  # type: ignore[arg-type]
        raise FeatureCacheError(f"split {split!r}: {len(ids)} sample ids for a dataset of {len(dataset)} samples")  # type: ignore[arg-type]
    if len(set(ids)) != len(ids):
        raise FeatureCacheError(f"split {split!r}: sample ids are not unique")
    return ids


def extract_split_features(
    backbone: Any,
    datasets: Mapping[str, Dataset],
    out_dir: str | Path,
    transform_desc: str,
    sample_ids: Mapping[str, Sequence[str]] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    max_batch_size: int = 64,
    fallback_batch_size: int = 32,
    num_workers: int | None = None,
    store_labels: bool = True,
) -> CacheManifest:
    """Extract CLS features of every split in ``datasets`` into ``out_dir`` and return the manifest.

    ``backbone`` is a :class:`~stage1_core.model.backbone.DINOv3Backbone` (anything with
    ``extract``, ``fingerprint()``, ``hidden_size``). Each dataset yields ``(pixel_values,
    label)`` in ``sample_ids[split]`` order (default: ``dataset.sample_ids``). Splits already
    cached for the same fingerprint, transform and ids are reused without a forward pass; the
    returned manifest's ``forward_passes`` counts the batches run in this call. ``batch_size``
    ``None`` asks :func:`~stage1_core.data.loaders.pick_batch_size` (max, else fallback).
    ``store_labels=False`` writes features only: the pipeline keys its store by image content and
    joins labels from the dataset index at use, so relabelling never invalidates features and a
    stale label can never be read from the cache. One process only: a rank of a ``torchrun`` job
    is refused; :func:`stage1_core.distributed.extract.extract_features` serves both.
    """
    from stage1_core.locking import LOCK_NAME, default_timeout, path_lock

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    from stage1_core.distributed import env

    if env.active():
        raise FeatureCacheError(
            f"{directory}: extract_split_features runs in one process, and this one is a rank of a torchrun "
            "job; call stage1_core.distributed.extract.extract_features, which shards the rows over the ranks"
        )
    # One writer per cache directory (phases sharing a backbone share it); a second one waits
    # (STAGE1_LOCK_TIMEOUT) or is refused, and once in, reuses what the first one wrote.
    with path_lock(directory / LOCK_NAME, f"feature cache {directory}", timeout=default_timeout()):
        from stage1_core.dirswap import clean_leftovers

        clean_leftovers(directory)  # temporary files of a writer killed in this cache
        return _extract_locked(
            backbone, datasets, directory, transform_desc, sample_ids, batch_size, device, progress,
            max_batch_size, fallback_batch_size, num_workers, store_labels,
        )


def _extract_locked(
    backbone: Any,
    datasets: Mapping[str, Dataset],
    directory: Path,
    transform_desc: str,
    sample_ids: Mapping[str, Sequence[str]] | None,
    batch_size: int | None,
    device: str | torch.device | None,
    progress: bool,
    max_batch_size: int,
    fallback_batch_size: int,
    num_workers: int | None,
    store_labels: bool,
) -> CacheManifest:
    """:func:`extract_split_features` once the cache directory's lock is held."""
    from stage1_core.data.loaders import pick_batch_size

    manifest, ids_per_split, todo = plan_extraction(backbone, datasets, directory, transform_desc, sample_ids)
    if not todo:
        logger.info("feature cache %s reused for splits %s (0 forward passes)", directory, list(manifest.reused_splits))
        return manifest
    # Until the new splits are complete the manifest lists only the splits that stay valid.
    _write_manifest(manifest)
    device = torch.device(device) if device is not None else backbone.device
    if batch_size is None:
        sample_shape = tuple(datasets[todo[0]][0][0].shape) if device.type == "cuda" else (3, 224, 224)
        batch_size = pick_batch_size(backbone, max_batch_size, fallback_batch_size, device, sample_shape)
    passes = 0
    entries = manifest.splits
    for split in todo:
        features, labels, done = extract_rows(backbone, datasets[split], batch_size, device, num_workers=num_workers,
                                              progress=progress, desc=f"extract {split}", store_labels=store_labels)
        passes += done
        entries[split] = split_entry(split, ids_per_split[split], features, labels if store_labels else None, directory)
        logger.info("extracted %s features %s -> %s", split, tuple(features.shape), directory / features_file(split))
    return finish_manifest(manifest, entries, ids_per_split, passes)


def finish_manifest(manifest: CacheManifest, entries: dict[str, dict[str, Any]],
                    ids_per_split: Mapping[str, Sequence[str]], forward_passes: int) -> CacheManifest:
    """List ``entries`` (their files already written) in the manifest and write it: the cache's last write."""
    manifest.splits = entries
    manifest.key = _key_of(manifest.backbone_fingerprint, manifest.transform, entries, ids_per_split)
    manifest.forward_passes = forward_passes
    _write_manifest(manifest)
    return manifest


def plan_extraction(
    backbone: Any,
    datasets: Mapping[str, Dataset],
    directory: Path,
    transform_desc: str,
    sample_ids: Mapping[str, Sequence[str]] | None,
) -> tuple[CacheManifest, dict[str, list[str]], list[str]]:
    """``(manifest listing the splits that stay valid, ids per requested split, splits to extract)``."""
    fingerprint = backbone.fingerprint()
    ids_per_split = {split: _dataset_ids(split, ds, sample_ids) for split, ds in datasets.items()}
    previous = _try_manifest(directory)
    if previous is not None and (previous.backbone_fingerprint != fingerprint or previous.transform != transform_desc):
        previous = None
    reused = [s for s, ids in ids_per_split.items() if _reusable(previous, s, ids)]
    todo = [s for s in ids_per_split if s not in reused]
    entries: dict[str, dict[str, Any]] = {}
    if previous is not None:
        # Other splits already in the directory stay listed while still valid for this backbone.
        kept = [s for s in previous.splits if s not in ids_per_split and _split_files_ok(directory, previous.splits[s])]
        entries = {s: previous.splits[s] for s in [*kept, *reused]}
    manifest = CacheManifest(
        directory=directory,
        key=_key_of(fingerprint, transform_desc, entries, ids_per_split),
        backbone_fingerprint=fingerprint,
        transform=transform_desc,
        hidden_size=int(backbone.hidden_size),
        dtype="float32",
        created_at=previous.created_at if (previous is not None and not todo) else _now(),
        source="extracted",
        splits=entries,
        backbone={"source": getattr(backbone, "source", None), "dtype": str(getattr(backbone, "dtype", ""))},
        reused_splits=tuple(reused),
    )
    return manifest, ids_per_split, todo


def extract_rows(
    backbone: Any,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "extract",
    store_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(features [N, hidden] float32 CPU, labels [N] int64, forward passes)`` of every row of ``dataset``.

    Batches are consecutive rows of ``batch_size`` (the last one may be smaller), so the rows of a
    batch - and hence the features, on a fixed thread count - do not depend on who runs it.
    """
    from stage1_core.data.loaders import ThreadBatches, make_dataloader
    from stage1_core.progress import progress as tqdm

    n = len(dataset)  # type: ignore[arg-type]
    features = torch.empty((n, backbone.hidden_size), dtype=torch.float32)
    labels = torch.empty((n,), dtype=torch.int64)
    # The evaluation transform runs as uint8 decode/resize/crop in decoding threads (or
    # DataLoader workers) and one normalisation per batch on the device: bit-identical to
    # the per-image transform, so the transform text is the cache key either way.
    fast = dataset.eval_pixels() if hasattr(dataset, "eval_pixels") else None
    if fast is not None and THREADED_DECODING:
        pixels, pipeline = fast
        loader: Any = ThreadBatches(pixels, batch_size, num_workers=num_workers, device=device)
    else:
        source, pipeline = fast if fast is not None else (dataset, None)
        loader = make_dataloader(source, batch_size, train=False, num_workers=num_workers, device=device)
    position = passes = 0
    for images, targets in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        images = images.to(device, non_blocking=True)
        batch = backbone.extract(pipeline.normalise(images) if pipeline is not None else images)
        passes += 1
        size = batch.shape[0]
        features[position : position + size] = batch.float().cpu()
        if store_labels:
            labels[position : position + size] = torch.as_tensor(targets, dtype=torch.int64)
        position += size
    if position != n:
        raise FeatureCacheError(f"{desc}: the loader yielded {position} samples, expected {n}")
    return features, labels, passes


def _load_tensor(path: Path) -> torch.Tensor:
    from stage1_core.artifacts import load_tensors

    try:
        tensor = load_tensors(path)
    except ArtifactError as exc:
        raise FeatureCacheError(str(exc)) from exc
    if not isinstance(tensor, torch.Tensor):
        raise FeatureCacheError(f"{path}: expected a tensor, found {type(tensor).__name__}")
    return tensor


def load_cached_features(
    cache_dir: str | Path,
    splits: Sequence[str] | None = None,
    verify: bool = True,
    labels: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, TensorSplit]:
    """Load splits (all by default) of a manifest cache as :class:`TensorSplit` with sample ids.

    With ``verify`` the files' sha256 must match the manifest. ``labels`` (per split, in the
    cache's row order) replaces the stored labels; a cache written without labels needs it.
    """
    manifest = read_manifest(cache_dir)
    names = list(manifest.splits) if splits is None else list(splits)
    missing = [s for s in names if s not in manifest.splits]
    if missing:
        raise FeatureCacheError(
            f"{manifest.directory}: cache has no split(s) {missing} (it has {sorted(manifest.splits)})"
        )
    out: dict[str, TensorSplit] = {}
    for name in names:
        entry = manifest.splits[name]
        problems = _split_file_problems(manifest.directory, entry) if verify else []
        if problems:
            raise FeatureCacheError(
                f"split {name!r} of the feature cache refused, not loaded: {'; '.join(problems)}; extract the "
                f"features again (re-materialise cached_features: only the damaged splits are recomputed)"
            )
        features = _load_tensor(manifest.directory / entry["features_file"])
        if labels is not None and name in labels:
            split_labels = torch.as_tensor(labels[name], dtype=torch.int64)
        elif entry["labels_file"] is None:
            raise FeatureCacheError(
                f"{manifest.directory}: split {name!r} was cached without labels; join them from the dataset index"
            )
        else:
            split_labels = _load_tensor(manifest.directory / entry["labels_file"])
        if features.ndim != 2 or features.shape != (entry["num_samples"], manifest.hidden_size):
            raise FeatureCacheError(
                f"{manifest.directory / entry['features_file']}: shape {tuple(features.shape)}, manifest says "
                f"({entry['num_samples']}, {manifest.hidden_size})"
            )
        out[name] = TensorSplit(features.float(), split_labels.long(), tuple(entry["sample_ids"]), name)
    return out


def load_legacy_features(cache_dir: str | Path, splits: Sequence[str] = LEGACY_SPLITS) -> dict[str, TensorSplit]:
    """Load the old script's ``<split>_features.pt`` / ``<split>_labels.pt`` (no ids, no manifest)."""
    directory = Path(cache_dir)
    out: dict[str, TensorSplit] = {}
    for split in splits:
        feats_path, labels_path = directory / features_file(split), directory / labels_file(split)
        missing = [str(p) for p in (feats_path, labels_path) if not p.is_file()]
        if missing:
            raise FeatureCacheError(f"{directory}: legacy cache lacks {missing} (run extract_features first)")
        features, labels = _load_tensor(feats_path), _load_tensor(labels_path)
        try:
            out[split] = TensorSplit(features.float(), labels.long(), None, split)
        except ValueError as exc:
            raise FeatureCacheError(f"{feats_path}: {exc}") from exc
    return out


def import_legacy_cache(
    old_dir: str | Path,
    out_dir: str | Path,
    *,
    sample_ids: Mapping[str, Sequence[str]],
    backbone_fingerprint: str,
    transform_desc: str,
    expected_labels: Mapping[str, Sequence[int]] | None = None,
) -> CacheManifest:
    """Turn the old script's cache (``train_*.pt``, ``val_*.pt``) into a manifest cache in ``out_dir``.

    ``sample_ids[split]`` are the split's ids in the order the old script extracted them (its
    labels CSV order, see the module docstring); ``expected_labels[split]`` (same order) are
    compared with the stored labels and any difference is reported with row numbers.
    ``out_dir`` may equal ``old_dir`` (the manifest is added in place).
    """
    legacy = load_legacy_features(old_dir, tuple(sample_ids))
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for split, ids in sample_ids.items():
        data = legacy[split]
        if len(ids) != len(data):
            problems.append(
                f"{split}: {len(data)} rows in {Path(old_dir) / features_file(split)} but {len(ids)} sample ids given"
            )
            continue
        if len(set(ids)) != len(ids):
            problems.append(f"{split}: the given sample ids are not unique")
        if expected_labels is not None and split in expected_labels:
            expected = torch.as_tensor(list(expected_labels[split]), dtype=torch.int64)
            if expected.shape != data.labels.shape:
                problems.append(f"{split}: {expected.numel()} expected labels for {len(data)} rows")
            else:
                rows = torch.nonzero(expected != data.labels).flatten().tolist()
                if rows:
                    shown = ", ".join(f"row {r} ({ids[r]}): file {int(data.labels[r])} vs csv {int(expected[r])}" for r in rows[:5])
                    problems.append(
                        f"{split}: {len(rows)} stored label(s) differ from the labels CSV ({shown}) - the CSV "
                        f"or its order changed since the old script extracted these features"
                    )
    hidden = {s.hidden_size for s in legacy.values()}
    if len(hidden) != 1:
        problems.append(f"splits have different feature sizes {sorted(hidden)}")
    if problems:
        raise FeatureCacheError(f"{old_dir}: cannot import the legacy cache:\n  " + "\n  ".join(problems))
    entries = {
        split: split_entry(split, sample_ids[split], legacy[split].features.contiguous(), legacy[split].labels, directory)
        for split in sample_ids
    }
    manifest = CacheManifest(
        directory=directory,
        key=cache_key(backbone_fingerprint, transform_desc, sample_ids),
        backbone_fingerprint=backbone_fingerprint,
        transform=transform_desc,
        hidden_size=hidden.pop(),
        dtype="float32",
        created_at=_now(),
        source="legacy-import",
        splits=entries,
        backbone={"imported_from": str(Path(old_dir).resolve())},
    )
    _write_manifest(manifest)
    return manifest
