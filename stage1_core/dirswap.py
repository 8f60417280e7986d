"""Replace a whole directory in one atomic step, and clean what a killed swap left behind.

Linux cannot rename a directory over a non-empty one, so "remove the old, rename the new" leaves
the name empty for a moment - and for good when the process is killed in between. Instead the
name is a symbolic link to a hidden sibling version directory:

1. the new content is written into a staging directory ``.<name>.tmp-*`` next to the name;
2. every file in it and the directory itself are fsynced, and it is renamed to a version
   ``.<name>.v-<token>``;
3. a temporary link to that version is ``os.replace``-d over ``<name>`` (atomic) and the parent
   directory is fsynced;
4. the previous version is removed.

A reader resolving ``<name>`` at any moment, a kill at any point included, gets the complete old
directory or the complete new one. :func:`clean_leftovers` removes staging directories,
unreferenced versions, temporary links and temporary files (``.*.tmp``) of a killed writer; a
step calls it on its own partition once it holds that partition's write lock, so it never
touches a concurrent writer's files. ``STAGE1_FAULT_INJECT`` kill points (``before-rename``: the
version is complete but not yet linked; ``after-rename``: linked, the previous version not yet
removed) match the final name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from stage1_core.artifacts import fault_point, fsync_dir

__all__ = ["clean_leftovers", "fsync_tree", "replace_dir", "staging_dir"]

_LEFTOVER = re.compile(r"^\..+(\.tmp|\.tmp-[^/]*|\.link-tmp|\.link|\.old-[^/]*)$|^\.staging-.+$")
_VERSION = re.compile(r"^\.(?P<name>.+)\.v-[0-9a-f]{32}$")


def staging_dir(target: str | Path) -> Path:
    """A fresh staging directory for ``target``'s next content (a hidden sibling)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and directory under ``directory`` (the directory itself included)."""
    for base, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(base)


def replace_dir(staged: str | Path, target: str | Path) -> Path:
    """Make the complete directory ``staged`` the content of ``target`` atomically; return ``target``.

    ``target`` becomes a symbolic link to ``.<name>.v-<token>`` (a real directory left by an older
    release is moved aside first: the name is briefly absent that one time). ``staged`` must be
    on the same file system (use :func:`staging_dir`).
    """
    staged, target = Path(staged), Path(target)
    parent = target.parent
    fsync_tree(staged)
    version = parent / f".{target.name}.v-{uuid.uuid4().hex}"
    os.rename(staged, version)
    fsync_dir(parent)
    fault_point(target, "before-rename")
    previous = _current_version(target)
    if target.exists() and not target.is_symlink():
        legacy = parent / f".{target.name}.v-{uuid.uuid4().hex}"
        os.rename(target, legacy)
        previous = legacy
    link = parent / f".{target.name}.link-tmp"
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    os.replace(link, target)
    fsync_dir(parent)
    fault_point(target, "after-rename")
    if previous is not None and previous != version:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def _current_version(target: Path) -> Path | None:
    """The version directory ``target`` links to (None when it is not such a link)."""
    if not target.is_symlink():
        return None
    pointed = os.readlink(target)
    return target.parent / pointed if "/" not in pointed else None


def clean_leftovers(directory: str | Path) -> list[Path]:
    """Remove what killed writers left under ``directory``; return the removed paths.

    Staging directories and temporary files or links (``.*.tmp``, ``.*.tmp-*``, ``.*.link-tmp``,
    ``.*.link``, ``.*.old-*``, ``.staging-*``) and versions ``.<name>.v-*`` that ``<name>`` does not link
    to. Call it only while holding the write lock of ``directory``.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for base, dirs, files in os.walk(directory):
        here = Path(base)
        for name in [*dirs, *files]:
            path = here / name
            version = _VERSION.match(name)
            stale = bool(_LEFTOVER.match(name))
            if version is not None:
                stale = _current_version(here / version.group("name")) != path
            if not stale:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if (here / d).is_dir()]
    return removed


def publish_directory(staged: str | Path, target: str | Path, replace: bool = True) -> Path:
    """Move the finished directory ``staged`` to ``target`` atomically and return ``target``.

    ``staged`` must be a sibling of ``target`` (same file system); it is fsynced first. A new
    ``target`` is one rename (parent fsynced); with ``replace`` an existing ``target`` is replaced
    by a link flip (:func:`replace_dir`), so the name always holds the previous
    or the complete new content, a kill included; without it an existing ``target`` raises
    FileExistsError and ``staged`` is left for the caller.
    """
    staged, target = Path(staged), Path(target)
    if not target.exists() and not target.is_symlink():
        fsync_tree(staged)
        os.rename(staged, target)
        fsync_dir(target.parent)
        return target
    if not replace:
        raise FileExistsError(f"{target} exists; not replacing it with {staged}")
    return replace_dir(staged, target)
