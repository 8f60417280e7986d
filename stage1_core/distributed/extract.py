"""Feature extraction sharded over the ranks of a ``torchrun`` job, into the content-addressed store.

Each split's rows are cut into batches of ``batch_size`` consecutive rows - the same batches a
single process runs - and every rank takes a contiguous run of whole batches
(:func:`shard_rows`). So on CPU, with the same thread count per process, a rank computes the
very floats one process would, and the merged cache is byte-identical to a one-rank run.

Crash safety, in write order:

1. a rank writes its shard as ``.shards/<split>.<digest>.<start>-<stop>.b<batch>.pt`` (atomic:
   temporary file + rename), so a shard file is either complete or absent; the name holds the
   rows, the batch size and a digest of backbone, transform and the split's ids;
2. all ranks meet at a barrier: rank 0 passes it only when every shard exists;
3. rank 0 concatenates the shards, writes each split's files, then the manifest - once, last -
   and then deletes the shards.

A rank killed anywhere leaves the manifest untouched (``torchrun`` then stops the others), so
the store never lists a half-merged split; a split file rewritten before the crash no longer
matches the sha256 a stale manifest records and is refused on load. The re-run reuses the
complete shards and extracts only the missing ones; a completed store is reused with zero
forward passes. Rank 0 holds the store's lock (:func:`stage1_core.locking.path_lock`) from the
plan to the manifest, so no second job writes the same store meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Subset

from stage1_core.distributed import env

if TYPE_CHECKING:
    from stage1_core.features import CacheManifest

logger = logging.getLogger(__name__)

SHARD_DIR = ".shards"


def shard_rows(num_rows: int, batch_size: int, world: int, index: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``index``: a contiguous run of whole batches of ``batch_size``."""
    batches = env.rank_slice(math.ceil(num_rows / batch_size), world, index)
    return min(batches.start * batch_size, num_rows), min(batches.stop * batch_size, num_rows)


class RowSubset(Subset):
    """``Subset`` that keeps the dataset's fast evaluation path (``eval_pixels``) for its rows."""

    def eval_pixels(self) -> tuple[Dataset, Any] | None:
        fast = self.dataset.eval_pixels() if hasattr(self.dataset, "eval_pixels") else None
        return None if fast is None else (Subset(fast[0], self.indices), fast[1])


def _digest(fingerprint: str, transform_desc: str, ids: Sequence[str]) -> str:
    payload = json.dumps([fingerprint, transform_desc, list(ids)], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def shard_path(directory: Path, split: str, digest: str, rows: tuple[int, int], batch_size: int) -> Path:
    return directory / SHARD_DIR / f"{split}.{digest}.{rows[0]}-{rows[1]}.b{batch_size}.pt"


def _load_shard(path: Path, rows: int, hidden: int) -> dict[str, torch.Tensor] | None:
    """A complete shard of ``rows`` rows, else None (absent, unreadable or of another shape)."""
    from stage1_core.artifacts import ArtifactError, load_tensors

    if not path.is_file():
        return None
    try:
        data = load_tensors(path)
    except ArtifactError as exc:
        logger.warning("ignoring unreadable shard %s: %s", path, exc)
        return None
    ok = (isinstance(data, dict) and isinstance(data.get("features"), torch.Tensor)
          and tuple(data["features"].shape) == (rows, hidden) and tuple(data["labels"].shape) == (rows,))
    return data if ok else None


def extract_features(
    backbone: Any,
    datasets: Mapping[str, Dataset],
    out_dir: str | Path,
    transform_desc: str,
    sample_ids: Mapping[str, Sequence[str]] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **options: Any,
) -> CacheManifest:
    """Extract into the feature store from one process or from every rank of a ``torchrun`` job.

    One process: :func:`stage1_core.features.extract_split_features`, whose arguments these are
    (``options``: its keyword-only ones). A rank of a job: each rank extracts its shard and rank 0
    merges and writes the manifest (:func:`extract_sharded`). The same manifest either way.
    """
    from stage1_core import features

    if env.active():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return extract_sharded(backbone, datasets, Path(out_dir), transform_desc, sample_ids, batch_size, device,
                               progress, **options)
    return features.extract_split_features(backbone, datasets, out_dir, transform_desc, sample_ids, batch_size, device,
                                           progress, **options)


def extract_sharded(
    backbone: Any,
    datasets: Mapping[str, Dataset],
    directory: Path,
    transform_desc: str,
    sample_ids: Mapping[str, Sequence[str]] | None,
    batch_size: int | None,
    device: str | torch.device | None,
    progress: bool,
    *,
    max_batch_size: int = 64,
    fallback_batch_size: int = 32,
    num_workers: int | None = None,
    store_labels: bool = True,
) -> Any:
    """:func:`stage1_core.features.extract_split_features` for one rank of the job (every rank calls it)."""
    from stage1_core import features
    from stage1_core.artifacts import save_tensors
    from stage1_core.data.loaders import pick_batch_size
    from stage1_core.locking import LOCK_NAME, default_timeout, path_lock

    world, me = env.world_size(), env.rank()
    device = torch.device(device) if device is not None else backbone.device
    with contextlib.ExitStack() as stack:
        plan: dict[str, Any] | None = None
        if env.is_main():
            stack.enter_context(path_lock(directory / LOCK_NAME, f"feature cache {directory}", timeout=default_timeout()))
            manifest, ids_per_split, todo = features.plan_extraction(backbone, datasets, directory, transform_desc,
                                                                     sample_ids)
            plan = {"todo": todo, "ids": ids_per_split}
        plan = env.broadcast_object(plan)
        todo, ids_per_split = plan["todo"], plan["ids"]
        if not todo:
            env.barrier()
            return manifest if env.is_main() else features.read_manifest(directory)
        if batch_size is None:
            batch_size = pick_batch_size(backbone, max_batch_size, fallback_batch_size, device)
        batch_size = env.all_reduce_min(int(batch_size))  # every rank must cut the same batches
        fingerprint = backbone.fingerprint()
        passes = 0
        for split in todo:
            ids = ids_per_split[split]
            rows = shard_rows(len(ids), batch_size, world, me)
            path = shard_path(directory, split, _digest(fingerprint, transform_desc, ids), rows, batch_size)
            if rows[1] > rows[0] and _load_shard(path, rows[1] - rows[0], int(backbone.hidden_size)) is None:
                part = RowSubset(datasets[split], range(*rows))
                feats, labels, done = features.extract_rows(
                    backbone, part, batch_size, device, num_workers=num_workers, progress=progress,
                    desc=f"extract {split} [rank {me}/{world}]", store_labels=store_labels)
                passes += done
                save_tensors(path, {"features": feats, "labels": labels})
        passes = int(env.all_reduce_sum([passes])[0])
        env.barrier()  # every shard of every split is on disk past this point
        if env.is_main():
            entries = manifest.splits
            for split in todo:
                ids = ids_per_split[split]
                digest = _digest(fingerprint, transform_desc, ids)
                paths = [shard_path(directory, split, digest, shard_rows(len(ids), batch_size, world, r), batch_size)
                         for r in range(world)]
                parts = [_load_shard(p, b - a, int(backbone.hidden_size)) for p, (a, b) in
                         ((p, shard_rows(len(ids), batch_size, world, r)) for r, p in enumerate(paths)) if b > a]
                if any(part is None for part in parts):
                    raise features.FeatureCacheError(f"{directory / SHARD_DIR}: a shard of {split!r} is missing "
                                                     f"after every rank finished; extract again")
                feats = torch.cat([part["features"] for part in parts])
                labels = torch.cat([part["labels"] for part in parts])
                entries[split] = features.split_entry(split, ids, feats, labels if store_labels else None, directory)
            manifest = features.finish_manifest(manifest, entries, ids_per_split, passes)
            for split in todo:
                ids = ids_per_split[split]
                digest = _digest(fingerprint, transform_desc, ids)
                for leftover in (directory / SHARD_DIR).glob(f"{split}.{digest}.*"):
                    leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (directory / SHARD_DIR).rmdir()
            logger.info("merged %d shard(s) per split of %s into %s", world, todo, directory)
        env.barrier()  # the manifest exists past this point
    if env.is_main():
        return manifest
    merged = features.read_manifest(directory)
    merged.forward_passes = passes
    return merged
