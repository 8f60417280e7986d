"""Batch-size probing and DataLoader construction.

``pick_batch_size`` keeps the baseline's rule (try the maximum batch on CUDA, fall back when it
runs out of memory, CPU uses the maximum). ``make_dataloader`` encodes the loader policy in one
place: shuffling and ``drop_last`` only for training, pinned memory only when batches go to a
CUDA device, persistent workers whenever there are workers, at most one worker per CPU, and a
seeded generator so the shuffle order is reproducible.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 8


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, (list, tuple)):
        values = list(output)
    else:
        values = [v for v in vars(output).values()] if hasattr(output, "__dict__") else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor to backpropagate")


def _try_batch(
    model: torch.nn.Module,
    batch_size: int,
    make_batch: Callable[[int], torch.Tensor],
    backward: bool,
) -> None:
    batch = make_batch(batch_size)
    if backward:
        output = model(batch)
        _first_tensor(output).float().sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(batch)
    del batch


def pick_batch_size(
    model: torch.nn.Module,
    max_batch_size: int,
    fallback_batch_size: int,
    device: str | torch.device,
    sample_shape: Sequence[int] = (3, 224, 224),
    make_batch: Callable[[int], torch.Tensor] | None = None,
    backward: bool = False,
) -> int:
    """Return ``max_batch_size`` if a dummy batch of that size fits, else ``fallback_batch_size``.

    On CPU (or without CUDA) no probe runs and ``max_batch_size`` is returned. On CUDA a batch of
    zeros of ``sample_shape`` (or ``make_batch(n)``) goes through ``model`` (forward only, or
    forward + backward when ``backward``); on ``torch.cuda.OutOfMemoryError`` the cache is freed
    and the fallback size is probed the same way. If that also runs out of memory a
    ``RuntimeError`` says so rather than starting a run that will crash later.
    """
    if max_batch_size < 1 or fallback_batch_size < 1:
        raise ValueError(
            f"batch sizes must be >= 1 (max_batch_size={max_batch_size}, fallback_batch_size={fallback_batch_size})"
        )
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return max_batch_size
    if make_batch is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

        def make_batch(n: int) -> torch.Tensor:
            return torch.zeros((n, *sample_shape), dtype=dtype, device=device)

    candidates = [max_batch_size] + ([fallback_batch_size] if fallback_batch_size < max_batch_size else [])
    for size in candidates:
        try:
            _try_batch(model, size, make_batch, backward)
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            logger.warning("batch size %d does not fit on %s (CUDA out of memory)", size, device)
            continue
        torch.cuda.empty_cache()
        if size != max_batch_size:
            logger.warning("using fallback batch size %d instead of %d", size, max_batch_size)
        return size
    raise RuntimeError(
        f"even the fallback batch size {fallback_batch_size} runs out of CUDA memory on {device} - "
        f"lower fallback_batch_size (and raise grad_accum_steps to keep the effective batch)"
    )


def resolve_num_workers(num_workers: int | None = None) -> int:
    """Worker count: ``num_workers`` (default ``min(8, CPUs)``) bounded by ``os.cpu_count()``."""
    cpus = os.cpu_count() or 1
    if num_workers is None:
        return min(DEFAULT_MAX_WORKERS, cpus)
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    if num_workers > cpus:
        logger.warning("num_workers=%d exceeds the %d CPUs of this machine; using %d", num_workers, cpus, cpus)
    return min(num_workers, cpus)


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a worker from the per-worker torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A DataLoader following the loader policy (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if train and len(dataset) < batch_size:  # type: ignore[arg-type]
        raise ValueError(
            f"training set has {len(dataset)} samples, fewer than batch_size={batch_size}; with "  # type: ignore[arg-type]
            f"drop_last it would yield no batch - lower the batch size or add data"
        )
    workers = resolve_num_workers(num_workers)
    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
        collate_fn=collate_fn,
    )


def ordered_thread_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None, in_flight: int | None = None
) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Yield ``(item, fn(item), None)`` - or ``(item, None, error)`` - in input order, computed ahead in threads.

    For image decoding: PIL releases the GIL while it decodes and resamples, so threads overlap
    decoding with each other and with a forward pass, without worker processes to start or
    batches to ship between processes. At most ``in_flight`` items (default ``4 * workers``)
    are computed ahead of the consumer, so memory stays bounded on an endless stream.
    ``workers=0`` computes each item when it is consumed. ``workers=None`` uses
    :func:`resolve_num_workers`. Exceptions (``Exception`` subclasses) are returned, not
    raised, so the consumer decides per item.
    """
    workers = resolve_num_workers(workers)

    def call(item: Any) -> tuple[Any, BaseException | None]:
        try:
            return fn(item), None
        except Exception as exc:  # noqa: BLE001 - handed to the consumer with its item
            return None, exc

    if workers == 0:
        for item in items:
            yield (item, *call(item))
        return
    depth = max(1, in_flight if in_flight is not None else 4 * workers)
    iterator = iter(items)
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage1-decode") as pool:
        try:
            for item in itertools.islice(iterator, depth):
                pending.append((item, pool.submit(call, item)))
            while pending:
                item, future = pending.popleft()
                for following in itertools.islice(iterator, 1):
                    pending.append((following, pool.submit(call, following)))
                yield (item, *future.result())
        finally:
            for _, future in pending:
                future.cancel()


class ThreadBatches:
    """Ordered evaluation batches of a map-style dataset, items loaded ahead in threads.

    The in-process counterpart of :func:`make_dataloader` (``train=False``) for datasets whose
    items are decoded images: PIL releases the GIL while it decodes and resamples, so threads
    keep decoding while the backbone runs, with no worker processes to start per split and no
    batches to copy between processes. Batches are collated with ``default_collate`` and pinned
    when they go to a CUDA device. An item that fails raises its error when its batch is reached.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int | None = None, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.workers = resolve_num_workers(num_workers)
        self.pin = torch.device(device).type == "cuda" and torch.cuda.is_available()

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import default_collate

        items = ordered_thread_map(self.dataset.__getitem__, range(len(self.dataset)), self.workers,  # type: ignore[arg-type]
                                   in_flight=2 * self.batch_size)
        while True:
            chunk = list(itertools.islice(items, self.batch_size))
            if not chunk:
                return
            for _, _, error in chunk:
                if error is not None:
                    raise error
            batch = default_collate([value for _, value, _ in chunk])
            if self.pin:
                batch = [part.pin_memory() if isinstance(part, torch.Tensor) else part for part in batch]
            yield batch
