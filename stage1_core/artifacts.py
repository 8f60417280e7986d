"""Atomic, schema-validated reads and writes for every artifact the pipeline produces.

Every JSON document is validated against ``stage1_core/schemas/<name>.schema.json`` on write
*and* on read, and every write goes to a temporary file in the target directory that is then
``os.replace``-d into place, so a crash never leaves a half-written artifact behind. Tensors are
stored with ``torch.save`` and read back with ``torch.load(weights_only=True)`` so loading a file a
user hands us never executes code.

Fault injection (tests only): with ``STAGE1_FAULT_INJECT`` set, the atomic writers (and the
bundle publish, through :func:`fault_point`) SIGKILL their own process at a chosen point of a
chosen write, so a test can check that a crash at that point never leaves a partial file under a
final name. The value is ``<glob>:<when>[:<n>][:group]``: ``<glob>`` is matched (``fnmatch``)
against the target's absolute path, ``<when>`` is one of :data:`FAULT_POINTS` (``mid-write``
writes half the bytes into the temporary file, fsyncs them, then dies), ``<n>`` kills at the
n-th matching write of the process (default 1) and ``group`` kills the process group instead (a
``dagster asset materialize`` and its step processes, when started as their own group). Several
specs are separated by ``;``. Unset, each write costs one ``os.environ`` look-up.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import tempfile
from fnmatch import fnmatch
from functools import lru_cache
from importlib import resources
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PACKAGE = "stage1_core.schemas"
_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(ValueError):
    """An artifact is missing, unreadable or does not match its schema."""


FAULT_ENV = "STAGE1_FAULT_INJECT"
#: Where a write can be killed: before anything is written, with half the bytes in the
#: temporary file, with the whole temporary file written but not renamed, after the rename.
FAULT_POINTS = ("before-write", "mid-write", "before-rename", "after-rename")
_fault_hits: dict[str, int] = {}


def _fault_specs(text: str) -> list[tuple[str, str, int, bool]]:
    specs = []
    for raw in filter(None, (part.strip() for part in text.split(";"))):
        pattern, _, rest = raw.partition(":")
        fields = rest.split(":") if rest else []
        when = fields[0] if fields else ""
        nth, group = 1, False
        for extra in fields[1:]:
            if extra == "group":
                group = True
            elif extra.isdigit() and int(extra) >= 1:
                nth = int(extra)
            else:
                raise ValueError(f"{FAULT_ENV}={text!r}: {extra!r} is neither a count >= 1 nor 'group'")
        if not pattern or when not in FAULT_POINTS:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected <glob>:<when>[:<n>][:group], <when> one of {FAULT_POINTS}")
        specs.append((pattern, when, nth, group))
    return specs


def fault_point(path: str | Path, when: str) -> None:
    """Test hook: SIGKILL this process (or its group) if ``STAGE1_FAULT_INJECT`` names this write."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return
    target = str(Path(path).absolute())
    for pattern, point, nth, group in _fault_specs(text):
        if point != when or not fnmatch(target, pattern):
            continue
        key = f"{pattern}:{point}"
        _fault_hits[key] = _fault_hits.get(key, 0) + 1
        if _fault_hits[key] == nth:
            if group:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


#: Choice lists a schema names with ``{"x-choices": "<list>"}``, filled on every load from the
#: registry that owns them (``"module:function"``, imported on first use): the exit policies the
#: phase table names, the policy files of the registered policies.
_CHOICES: dict[str, Callable[[], Iterable[str]] | str] = {
    "exit_policy": "stage1_core.phases:exit_policy_names",
    "policy_file": "stage1_core.policies:policy_file_names",
}


def register_choices(name: str, provider: Callable[[], Iterable[str]]) -> None:
    """Let schemas refer to ``provider()``'s values as ``{"x-choices": name}`` (read on every load)."""
    _CHOICES[name] = provider


#: Schemas registered in code (a policy defined outside this package brings its own), by name.
_REGISTERED_SCHEMAS: dict[str, dict[str, Any]] = {}


def register_schema(name: str, schema: dict[str, Any]) -> None:
    """Make ``schema`` available as ``name`` to :func:`load_schema` (refused if a package file has that name)."""
    if resources.files(SCHEMA_PACKAGE).joinpath(f"{name}.schema.json").is_file():
        raise ArtifactError(f"schema {name!r} already exists as {SCHEMA_PACKAGE}/{name}.schema.json")
    jsonschema.validators.validator_for(schema).check_schema(schema)
    _REGISTERED_SCHEMAS[name] = schema


def unregister_schema(name: str) -> None:
    """Forget a schema registered with :func:`register_schema` (tests that add one for a while)."""
    _REGISTERED_SCHEMAS.pop(name, None)


@lru_cache(maxsize=None)
def _schema_file(name: str) -> tuple[dict[str, Any], bool]:
    try:
        text = resources.files(SCHEMA_PACKAGE).joinpath(f"{name}.schema.json").read_text("utf-8")
    except FileNotFoundError as exc:
        raise ArtifactError(f"unknown schema {name!r}: no {name}.schema.json in {SCHEMA_PACKAGE}") from exc
    return json.loads(text), '"x-choices"' in text


def _fill_choices(node: Any, schema: str) -> Any:
    if isinstance(node, dict):
        out = {k: _fill_choices(v, schema) for k, v in node.items()}
        if "x-choices" in node:
            provider = _CHOICES.get(node["x-choices"])
            if provider is None:
                raise ArtifactError(f"{schema}.schema.json refers to the choice list {node['x-choices']!r}, "
                                    f"which nothing registered; known: {sorted(_CHOICES)}")
            if isinstance(provider, str):
                module, _, attr = provider.partition(":")
                provider = _CHOICES[node["x-choices"]] = getattr(importlib.import_module(module), attr)
            out["enum"] = list(dict.fromkeys(provider()))
        return out
    if isinstance(node, list):
        return [_fill_choices(v, schema) for v in node]
    return node


def load_schema(name: str) -> dict[str, Any]:
    """Return the JSON schema called ``name`` (e.g. ``"thresholds"``), its choice lists filled."""
    if name in _REGISTERED_SCHEMAS:
        return _fill_choices(_REGISTERED_SCHEMAS[name], name)
    schema, has_choices = _schema_file(name)
    return _fill_choices(schema, name) if has_choices else schema


def _json_path(error: jsonschema.ValidationError) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def schema_errors(data: Any, schema: str) -> list[str]:
    """All violations of ``schema`` in ``data`` as ``"<json path>: <message>"`` strings."""
    resolved = load_schema(schema)
    validator_cls = jsonschema.validators.validator_for(resolved)
    validator = validator_cls(resolved, format_checker=validator_cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_json_path(e)}: {e.message}" for e in errors]


def validate(data: Any, schema: str, source: str | Path = "<memory>") -> None:
    """Raise :class:`ArtifactError` naming ``source`` and each failing JSON path."""
    problems = schema_errors(data, schema)
    if problems:
        listed = "\n  ".join(problems)
        raise ArtifactError(f"{source}: does not match {schema}.schema.json:\n  {listed}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    inject = bool(os.environ.get(FAULT_ENV))
    if inject:
        fault_point(path, "before-write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            if inject:
                half = len(data) // 2
                handle.write(data[:half])
                handle.flush()
                os.fsync(handle.fileno())
                fault_point(path, "mid-write")
                data = data[half:]
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if inject:
            fault_point(path, "before-rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if inject:
        fault_point(path, "after-rename")
    return path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so a rename or link swap inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of ``value``: numpy scalars to Python, tuples to lists, keys to str, and
    non-finite floats to None (JSON has no NaN or infinity; None reads as "not defined")."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any, schema: str | None = None) -> Path:
    """Validate ``data`` against ``schema`` (when given) and write it atomically as JSON."""
    if schema is not None:
        validate(data, schema, source=path)
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | Path, schema: str | None = None) -> Any:
    """Read JSON from ``path`` and validate it against ``schema`` (when given)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not UTF-8 text ({exc})") from exc
    if schema is not None:
        validate(data, schema, source=path)
    return data


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> Path:
    """``torch.save`` a dict of tensors (or plain values) atomically."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_tensors(path: str | Path, error: type[ArtifactError] = None) -> Any:
    """Load a file written by :func:`save_tensors` (or any torch.save) without executing code.

    Failures raise ``error`` (default :class:`ArtifactError`) naming the file: missing, empty,
    truncated, or holding objects other than tensors and plain values.
    """
    import pickle
    import zipfile

    import torch

    error = error or ArtifactError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found - check the path")
    if path.stat().st_size == 0:
        raise error(f"{path}: file is empty (an interrupted write?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(
            f"{path}: refused to load: it holds objects other than tensors and plain values "
            f"(loading it would execute code). Re-save it as a plain state_dict. Detail: {exc}"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise error(f"{path}: unreadable or truncated tensor file ({exc})") from exc


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
