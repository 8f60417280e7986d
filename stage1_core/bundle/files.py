"""Read a bundle directory's files without trusting them: no links, no special files, bounded sizes.

A bundle comes from elsewhere, so its files may be anything: a FIFO named ``model_best.pth``
(an ordinary ``open`` blocks for ever), a character device (``/dev/zero`` reads without end), a
socket, a directory where a file is declared, a symbolic link loop, a sparse file of many
gigabytes. :class:`BundleFiles` lists the directory with ``lstat`` semantics and opens each file
relative to the directory's own descriptor, one path component at a time, with ``O_NOFOLLOW``
(a link is refused, never followed) and ``O_NONBLOCK`` (a FIFO cannot block the open), then
checks the *open descriptor* with ``fstat``: it must be a regular file within the size cap. What
is checked is what is read - there is no window between a check and an open.

:meth:`BundleFiles.snapshot` copies the verified bytes into a private temporary directory, so
the parsers (policy, config, splits) read exactly the bytes whose checksums were compared, even
if the bundle directory changes meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "MAX_BACKBONE_FILE_BYTES",
    "MAX_ENTRIES",
    "MAX_FILE_BYTES",
    "MAX_MANIFEST_BYTES",
    "BundleFileError",
    "BundleFiles",
]

#: Largest ``bundle.json`` read (bytes); an exported manifest is a few kilobytes.
MAX_MANIFEST_BYTES = 1 << 20
#: Largest other file read into memory (head weights, policy and its companions, config, splits,
#: metrics, README). A head for the widest allowed backbone (hidden size 16384) is about 50 MB.
MAX_FILE_BYTES = 256 << 20
#: Largest file of a backbone carried in the bundle (hashed as a stream, never held in memory).
MAX_BACKBONE_FILE_BYTES = 64 << 30
#: Most directory entries a bundle may hold (an exported bundle holds about ten).
MAX_ENTRIES = 1000
#: Deepest directory nesting a bundle may have.
MAX_DEPTH = 8

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link",
}


class BundleFileError(OSError):
    """A bundle file that cannot be read safely; the message names the file and why."""


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


class BundleFiles:
    """One bundle directory, resolved once and opened once; every read goes through its descriptor.

    Use as a context manager (it holds the directory's descriptor). Raises :class:`BundleFileError`
    when the directory itself cannot be opened.
    """

    def __init__(self, directory: str | Path) -> None:
        self.root = Path(os.path.realpath(directory))
        try:
            self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BundleFileError(f"{self.root}: not a readable directory ({exc.strerror})") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "BundleFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- listing ------------------------------------------------------------------------

    def listing(self) -> tuple[dict[str, int], list[str]]:
        """Every entry under the directory that is not a directory: ``{relative path: st_mode}``.

        Links and special files are listed (with their ``lstat`` mode) but never followed; the
        second value lists problems of the tree itself (too many entries, too deep).
        """
        entries: dict[str, int] = {}
        problems: list[str] = []
        stack: list[tuple[str, int]] = [("", 0)]
        while stack:
            prefix, depth = stack.pop()
            try:
                with os.scandir(self._fd if not prefix else self.root / prefix) as scan:
                    children = list(scan)
            except OSError as exc:
                problems.append(f"{prefix or '.'}: cannot list the directory ({exc.strerror})")
                continue
            for entry in children:
                rel = f"{prefix}{entry.name}"
                try:
                    mode = entry.stat(follow_symlinks=False).st_mode
                except OSError as exc:
                    problems.append(f"{rel}: cannot stat ({exc.strerror})")
                    continue
                if stat.S_ISDIR(mode):
                    if depth + 1 >= MAX_DEPTH:
                        problems.append(f"{rel}: directories nested deeper than {MAX_DEPTH} levels; refusing the bundle")
                        continue
                    stack.append((rel + "/", depth + 1))
                else:
                    entries[rel] = mode
                if len(entries) + len(stack) > MAX_ENTRIES:
                    return entries, problems + [f"more than {MAX_ENTRIES} entries; not an exported bundle"]
        return entries, problems

    def kind(self, rel: str) -> str | None:
        """What ``rel`` is when it is not a regular file (None when it is one, or is missing)."""
        try:
            mode = os.stat(rel, dir_fd=self._fd, follow_symlinks=False).st_mode
        except OSError:
            return None
        return None if stat.S_ISREG(mode) else _kind(mode)

    # ----- reading ------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, rel: str, cap: int) -> Iterator[tuple[int, int]]:
        """Yield ``(descriptor, size)`` of the regular file ``rel`` (a POSIX path inside the bundle).

        Each directory component is opened with ``O_NOFOLLOW | O_DIRECTORY`` and the file with
        ``O_NOFOLLOW | O_NONBLOCK``; ``fstat`` of that descriptor must say "regular file" of at
        most ``cap`` bytes. Raises :class:`BundleFileError` naming ``rel`` otherwise.
        """
        parts = rel.split("/")
        fds: list[int] = []
        try:
            parent = self._fd
            for part in parts[:-1]:
                parent = self._open_at(rel, part, parent, os.O_RDONLY | os.O_DIRECTORY)
                fds.append(parent)
            fd = self._open_at(rel, parts[-1], parent, os.O_RDONLY | os.O_NONBLOCK)
            fds.append(fd)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BundleFileError(f"{rel}: is {_kind(info.st_mode)}, not a regular file; refusing to read it")
            if info.st_size > cap:
                raise BundleFileError(
                    f"{rel}: {info.st_size} bytes, over the {cap}-byte limit for this bundle file; refusing to read it"
                )
            os.set_blocking(fd, True)
            yield fd, info.st_size
        finally:
            for fd in reversed(fds):
                os.close(fd)

    @staticmethod
    def _open_at(rel: str, part: str, parent: int, flags: int) -> int:
        try:
            return os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                why = f"{part!r} is a symbolic link; bundle files must be regular files, not links"
            elif exc.errno == errno.ENOTDIR:
                why = f"{part!r} is not a directory"
            elif exc.errno == errno.ENOENT:
                why = "missing"
            else:
                why = f"cannot open {part!r} ({exc.strerror})"
            raise BundleFileError(f"{rel}: {why}") from None

    def read(self, rel: str, cap: int = MAX_FILE_BYTES) -> bytes:
        """The bytes of regular file ``rel`` (at most ``cap``; a file growing past it is refused)."""
        with self.open(rel, cap) as (fd, size):
            chunks, total = [], 0
            while True:
                chunk = os.read(fd, min(1 << 20, cap + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > cap:
                    raise BundleFileError(f"{rel}: grew past the {cap}-byte limit while being read")
        return b"".join(chunks)

    def sha256(self, rel: str, cap: int = MAX_BACKBONE_FILE_BYTES) -> str:
        """Hex sha256 of regular file ``rel``, streamed (for files too large to hold)."""
        digest, total = hashlib.sha256(), 0
        with self.open(rel, cap) as (fd, _):
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
                total += len(chunk)
                if total > cap:
                    raise BundleFileError(f"{rel}: grew past the {cap}-byte limit while being read")
        return digest.hexdigest()

    @staticmethod
    @contextlib.contextmanager
    def snapshot(contents: Mapping[str, bytes]) -> Iterator[Path]:
        """A private temporary directory holding ``contents`` (relative path -> bytes), removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="stage1-bundle-") as tmp:
            root = Path(tmp)
            for rel, data in contents.items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            yield root
