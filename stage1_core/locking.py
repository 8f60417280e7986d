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

:func:`step_locks` is what a pipeline step holds for its whole duration: the exclusive lock of
the asset partition it writes and a *shared* lock of every input it reads, so a second run can
neither rewrite an input while a step reads it nor write the same partition at the same time.
Its default wait comes from ``STAGE1_LOCK_TIMEOUT`` (seconds, default 0: refuse at once).
:func:`path_lock` locks any other shared directory (the content-addressed feature store).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import errno
import fcntl
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOCK_NAME", "LOCK_TIMEOUT_ENV", "AssetLockedError", "LockSpec", "VersionGoneError", "asset_lock",
           "default_timeout", "hold_locks", "in_scope", "lock_path", "lock_plan", "lock_scope", "path_lock",
           "step_locks", "version_hold", "version_lock_path"]

LOCK_NAME = ".lock"
POLL_SECONDS = 0.1
LOCK_TIMEOUT_ENV = "STAGE1_LOCK_TIMEOUT"


class AssetLockedError(RuntimeError):
    """Another process is writing this asset partition."""

    def __init__(
        self, asset: str, partition: str | None, path: Path, holder: str, waited: float, shared: bool = False
    ) -> None:
        self.asset, self.partition, self.path, self.holder = asset, partition, Path(path), holder
        wait = f" after waiting {waited:.1f} s" if waited > 0 else ""
        name = f"{asset}[{partition}]" if partition else asset
        if holder:
            doing, who = "being written", holder
        else:
            doing, who = "being read", "a step of another run that uses it as input"
        action = "read it while it changes" if shared else "write it concurrently"
        super().__init__(
            f"{name} is {doing} by another run ({who}); refusing to {action}{wait}. Wait for that run "
            f"to finish, or stop it, then run again (lock file {path}; the lock is released when the "
            f"holder exits; set {LOCK_TIMEOUT_ENV}=<seconds> to wait instead of refusing)."
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
    """The exclusive holder's line ("" while only shared holders hold the lock).

    A line naming a process of this host that no longer exists is stale (its holder was killed
    before it could clear it; the kernel released its lock): it is not reported as the holder.
    """
    handle.seek(0)
    line = handle.read().strip()
    match = re.match(r"pid (\d+) on (\S+) ", line + " ")
    if match and match.group(2) == socket.gethostname() and not _alive(int(match.group(1))):
        return ""
    return line


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_timeout() -> float:
    """Seconds a step waits for a lock: ``STAGE1_LOCK_TIMEOUT`` (default 0, refuse at once)."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r} must be >= 0 seconds")
    return value


@contextlib.contextmanager
def path_lock(
    path: str | Path, name: str, partition: str | None = None, timeout: float = 0.0, shared: bool = False
) -> Iterator[Path]:
    """Hold the ``flock`` of the file ``path`` (created when missing) for the ``with`` block.

    ``shared=True`` takes a shared (read) lock: any number of readers, no writer. ``name`` and
    ``partition`` only name the locked thing in the error. Raises :class:`AssetLockedError`
    when the lock is not free within ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    start = time.monotonic()
    handle = open(path, "a+", encoding="utf-8")
    try:
        while True:
            try:
                fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise AssetLockedError(name, partition, path, _holder(handle), waited, shared) from None
                time.sleep(min(POLL_SECONDS, max(timeout - waited, 0.0)))
                continue
            if _names_the_open_file(path, handle):
                break
            # The lock file was removed (remove_unheld) between our open and our flock: a lock on
            # that orphan inode excludes nobody who opens the path now. Lock the current file.
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()
            handle = open(path, "a+", encoding="utf-8")
        if shared and os.fstat(handle.fileno()).st_size:
            handle.truncate(0)  # a holder line left by a killed writer: no writer can hold it now
        if not shared:
            handle.seek(0)
            handle.truncate()
            stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
            handle.flush()
        try:
            yield path
        finally:
            if not shared:
                handle.seek(0)
                handle.truncate()
                handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _names_the_open_file(path: Path, handle) -> bool:
    """True when ``path`` still names the file ``handle`` has open (same device and inode)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


@contextlib.contextmanager
def asset_lock(
    root: str | Path, asset: str, partition: str | None = None, timeout: float = 0.0, shared: bool = False
) -> Iterator[Path]:
    """Hold the write lock of ``asset[partition]`` for the ``with`` block; yield the lock file.

    ``partition=None`` locks an unpartitioned asset (``dataset_index``, ``splits``).
    ``timeout=0`` (the default) refuses at once when another process holds it; a positive
    ``timeout`` waits up to that many seconds. ``shared=True`` takes the read lock instead.
    Raises :class:`AssetLockedError`.
    """
    with path_lock(lock_path(root, asset, partition), asset, partition, timeout, shared) as path:
        yield path


@dataclass(frozen=True)
class LockSpec:
    """One lock a step takes: its file, what it names (for the error) and whether it is shared."""

    path: Path
    name: str
    partition: str | None
    shared: bool


def lock_plan(
    root: str | Path,
    writes: Iterable[tuple[str, str | None]] = (),
    reads: Iterable[tuple[str, str | None]] = (),
) -> list[LockSpec]:
    """Every lock a step needs, in the one global order (sorted lock paths).

    Exclusive for each asset partition in ``writes``, shared for each in ``reads``; a partition
    both written and read is locked once, exclusively (locks are not re-entrant). Taking every
    step's locks in this order means two steps can never each hold a lock the other waits for.
    """
    wanted: dict[Path, LockSpec] = {}
    for name, part in writes:
        path = lock_path(root, name, part)
        wanted[path] = LockSpec(path, name, part, False)
    for name, part in reads:
        path = lock_path(root, name, part)
        wanted.setdefault(path, LockSpec(path, name, part, True))
    return [wanted[path] for path in sorted(wanted)]


def hold_locks(plan: Iterable[LockSpec], timeout: float | None = None) -> contextlib.ExitStack:
    """Take every lock of ``plan`` in order; return the stack that releases them (``close()``).

    All or nothing: when one lock is refused the ones already taken are released before
    :class:`AssetLockedError` propagates. ``timeout=None`` reads :func:`default_timeout`.
    """
    wait = default_timeout() if timeout is None else timeout
    stack = contextlib.ExitStack()
    try:
        for spec in plan:
            stack.enter_context(path_lock(spec.path, spec.name, spec.partition, wait, spec.shared))
    except BaseException:
        stack.close()
        raise
    return stack


_SCOPE: contextvars.ContextVar[list[contextlib.ExitStack] | None] = contextvars.ContextVar("stage1_lock_scope",
                                                                                      default=None)


@contextlib.contextmanager
def lock_scope() -> Iterator[None]:
    """Release, at the end of the block, every lock a step took inside it (however the step ended).

    A step releases its locks when it finishes; a runner (the Dagster asset wrapper, a gate
    check) wraps the step in this scope so that a step that raises releases them at once too.
    """
    stacks: list[contextlib.ExitStack] = []
    token = _SCOPE.set(stacks)
    try:
        yield
    finally:
        _SCOPE.reset(token)
        for stack in reversed(stacks):
            stack.close()


def in_scope(stack: contextlib.ExitStack) -> contextlib.ExitStack:
    """Register ``stack`` with the innermost :func:`lock_scope` (if any), so the scope releases it."""
    stacks = _SCOPE.get()
    if stacks is not None:
        stacks.append(stack)
    return stack


@contextlib.contextmanager
def step_locks(
    root: str | Path,
    asset: str,
    partition: str | None,
    inputs: Iterable[tuple[str, str | None]] = (),
    timeout: float | None = None,
) -> Iterator[None]:
    """Hold the write lock of ``asset[partition]`` and read locks of ``inputs`` for the ``with`` block.

    Locks are taken in :func:`lock_plan`'s order. ``timeout=None`` reads :func:`default_timeout`;
    it bounds the wait for each lock.
    """
    with hold_locks(lock_plan(root, [(asset, partition)], inputs), timeout):
        yield


# ----- published versions: readers hold, the publisher removes only what nobody holds -------------

#: Seconds a reader waits for a version's lock (the publisher holds it only while deleting).
VERSION_HOLD_TIMEOUT = 30.0


class VersionGoneError(FileNotFoundError):
    """The version a reader resolved was removed before the reader's hold was taken."""


def version_lock_path(version: str | Path) -> Path:
    """The lock of a published version directory: ``<versions>/.<name>.lock``, beside it (not inside:
    a bundle's file set is exact)."""
    version = Path(version)
    return version.parent / f".{version.name}.lock"


@contextlib.contextmanager
def version_hold(version: str | Path, timeout: float = VERSION_HOLD_TIMEOUT) -> Iterator[Path]:
    """Hold a shared lock on a published version for the ``with`` block: it is not removed meanwhile.

    Raises :class:`VersionGoneError` when the version was removed before the hold was taken (the
    caller resolves its link again).
    """
    version = Path(version)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(path_lock(version_lock_path(version), f"bundle version {version.name}",
                                          timeout=timeout, shared=True))
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # A read-only deployment: nobody can publish into it either, so there is nothing to hold.
        if not version.is_dir():
            raise VersionGoneError(f"{version}: removed by a newer publish before it could be read")
        yield version


def remove_unheld(version: str | Path) -> bool:
    """Remove a version directory and its lock file unless a reader holds it; True when removed."""
    import shutil

    version = Path(version)
    lock = version_lock_path(version)
    try:
        with path_lock(lock, f"bundle version {version.name}", timeout=0.0):
            shutil.rmtree(version, ignore_errors=True)
            lock.unlink(missing_ok=True)  # a reader waiting on it finds the version gone and re-resolves
    except AssetLockedError:
        return False
    return not version.exists()
