"""Micro-batching: requests that arrive together are decided in one forward pass.

A :class:`MicroBatcher` owns one worker thread. Each request submits its items as one job; the
worker takes the first waiting job, then keeps taking jobs until the batch holds ``max_batch``
items or ``max_wait_s`` has passed since that first job, runs ``run_batch`` once on all of them
and hands each job its own slice of the results. One thread runs the model, so a GPU sees large
batches instead of many small concurrent ones, and a single request never waits longer than
``max_wait_s`` for company. A job larger than ``max_batch`` runs alone (``run_batch`` bounds its
own forward passes).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["BatcherBusy", "BatcherStopped", "MicroBatcher"]

Item = TypeVar("Item")

#: How often an idle worker checks whether it was asked to stop (seconds).
IDLE_POLL_S = 0.1


class BatcherBusy(RuntimeError):
    """The queue of waiting jobs is full: the caller should answer 503 and let the client retry."""


class BatcherStopped(RuntimeError):
    """The batcher was stopped and takes no more jobs."""


@dataclass
class _Job(Generic[Item]):
    items: list[Item]
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Item]):
    """Collect jobs into batches of at most ``max_batch`` items, waiting at most ``max_wait_s``.

    ``run_batch(items)`` returns ``(context, results)`` with one result per item; each job's
    future resolves to ``(context, its results, batch size)`` so a caller learns which model
    answered (``context``) and how many items were decided together. If ``run_batch`` raises,
    every job of that batch gets the exception and the worker goes on with the next batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], tuple[Any, Sequence[Any]]],
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        name: str = "stage1-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0.0 <= max_wait_s <= 10.0:
            raise ValueError(f"max_wait_s must be in [0, 10] seconds, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Job[Item]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._carry: _Job[Item] | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[Item]) -> Future:
        """Queue ``items`` as one job; the future resolves to ``(context, results, batch_size)``."""
        if self._stop.is_set():
            raise BatcherStopped("the batcher is stopped")
        job: _Job[Item] = _Job(list(items))
        if not job.items:
            raise ValueError("a job needs at least one item")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise BatcherBusy(f"{self._queue.maxsize} requests are already waiting; retry shortly") from None
        return job.future

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, finish the batch in progress, fail the jobs still waiting."""
        self._stop.set()
        self._thread.join(timeout)
        pending = [self._carry] if self._carry is not None else []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None and not job.future.done():
                job.future.set_exception(BatcherStopped("the service is shutting down"))

    # ----- worker -----------------------------------------------------------------------

    def _next_batch(self) -> list[_Job[Item]]:
        """The next batch of jobs (empty when stopping), following the bounded-wait rule."""
        first = self._carry
        self._carry = None
        while first is None:
            if self._stop.is_set():
                return []
            try:
                first = self._queue.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                continue
            if not first.future.set_running_or_notify_cancel():
                first = None  # its caller gave up (timed out) before the job was taken
        jobs, size = [first], len(first.items)
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if not job.future.set_running_or_notify_cancel():
                continue
            if size + len(job.items) > self.max_batch:
                self._carry = job  # starts the next batch: never exceed max_batch by combining jobs
                break
            jobs.append(job)
            size += len(job.items)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if not jobs:
                return
            items = [item for job in jobs for item in job.items]
            try:
                context, results = self.run_batch(items)
                results = list(results)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request; the worker lives on
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                job.future.set_result((context, results[start : start + len(job.items)], len(items)))
                start += len(job.items)
