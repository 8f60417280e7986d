"""One writer per asset partition: an advisory file lock on ``<root>/<asset>/<partition>/.lock``.

Two runs that would write the same asset partition must not interleave their writes. Dagster's
own concurrency limits (run tag limits, concurrency pools) are enforced by the run queue and the
daemon, which ``dagster asset materialize`` (in-process execution) and direct use of
``stage1_core`` bypass; a lock taken by the code that writes works for every entry point.

The lock is ``fcntl.flock`` on a file inside the partition's directory:

* the kernel releases it when the holder exits, however it exits (SIGKILL included), so a crash
  never leaves a stale lock behind and no clean-up step is needed;
* by default a second writer is refused at once with :class:`AssetLockedError`, naming the asset,
  the partition, the lock file and the holder's pid (written into the lock file by the holder);
  ``timeout=`` makes it wait up to that many seconds first;
* it is advisory and per open file: it guards writers that use :func:`asset_lock`, on a local
  file system (not every network file system implements ``flock``), and it is not re-entrant
  within a process (a second ``asset_lock`` on the same partition refuses too).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "AssetLockedError", "asset_lock", "lock_path"]

LOCK_NAME = ".lock"
POLL_SECONDS = 0.1


class AssetLockedError(RuntimeError):
    """Another process is writing this asset partition."""

    def __init__(self, asset: str, partition: str | None, path: Path, holder: str, waited: float) -> None:
        self.asset, self.partition, self.path, self.holder = asset, partition, Path(path), holder
        wait = f" after waiting {waited:.1f} s" if waited > 0 else ""
        name = f"{asset}[{partition}]" if partition else asset
        super().__init__(
            f"{name} is being written by another run ({holder}); refusing to write it "
            f"concurrently{wait}. Wait for that run to finish, or stop it, then run again "
            f"(lock file {path}; the lock is released when the holder exits)."
        )


def lock_path(root: str | Path, asset: str, partition: str | None = None) -> Path:
    """Where the lock of ``asset[partition]`` lives: ``<root>/<asset>[/<partition>]/.lock``."""
    for label, part in (("asset", asset), ("partition", partition)):
        if part is None and label == "partition":
            continue
        if not isinstance(part, str) or not part or "/" in part or "\\" in part or part in (".", ".."):
            raise ValueError(f"{label} name {part!r} must be a single path component")
    directory = Path(root) / asset
    return (directory / partition if partition else directory) / LOCK_NAME


def _holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return text or "holder unknown"


@contextlib.contextmanager
def asset_lock(root: str | Path, asset: str, partition: str | None = None, timeout: float = 0.0) -> Iterator[Path]:
    """Hold the write lock of ``asset[partition]`` for the ``with`` block; yield the lock file.

    ``partition=None`` locks an unpartitioned asset (``dataset_index``, ``splits``).
    ``timeout=0`` (the default) refuses at once when another process holds it; a positive
    ``timeout`` waits up to that many seconds. Raises :class:`AssetLockedError`.
    """
    path = lock_path(root, asset, partition)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise AssetLockedError(asset, partition, path, _holder(handle), waited) from None
                time.sleep(min(POLL_SECONDS, max(timeout - waited, 0.0)))
        handle.seek(0)
        handle.truncate()
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()
