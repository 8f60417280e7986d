"""Lineage: every artifact records its content id and the ids of the inputs it was made from.

Each pipeline step ends by writing ``lineage.json`` next to its files (the last write, so a step
that died half-way leaves no record and counts as never run). A record holds

* ``id`` - the step's content id: a sha256 over its own output checksums, the config parameters
  it used and the ids of its direct inputs;
* ``inputs`` - the ids of the direct inputs, and ``chain`` - the ids of every ancestor (the union
  of the inputs' chains plus the inputs), so a stale link anywhere upstream is visible from here;
* ``params`` - the config values that determine the step's result (target and delta of a
  certificate, the training recipe, the split seed, ...);
* ``files`` - the sha256 of every output file, so a corrupted or replaced file is caught on read.

A consumer calls :func:`check_inputs` before it reads anything: every ancestor id recorded by its
inputs must equal that ancestor's current id, the inputs must agree on shared ancestors, every
ancestor's recorded ``params`` must equal what the live config asks for, and every recorded file
must still have its checksum. Any disagreement raises :class:`StaleInputError`, which names the
stale asset and what to re-materialise. The same ids are the assets' Dagster ``data_version``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1_core.artifacts import ArtifactError, jsonable, read_json, sha256_file, write_json

RECORD_FILE = "lineage.json"
ID_LENGTH = 24
SCHEMA_VERSION = 1


class StaleInputError(ValueError):
    """An input of a step was made from other data or settings than the ones current now."""

    def __init__(self, consumer: str, problems: list[str], rebuild: list[str]):
        self.consumer = consumer
        self.problems = list(problems)
        self.rebuild = list(rebuild)
        fix = (
            f"re-materialise {', '.join(rebuild)} and everything downstream of it"
            if rebuild else "re-materialise the named assets"
        )
        super().__init__(f"{consumer} refused, stale inputs:\n  " + "\n  ".join(problems) + f"\n  fix: {fix}")


def canonical_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces, floats as repr) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def content_id(*parts: Any) -> str:
    """sha256 (first 24 hex) of the canonical JSON of ``parts``."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:ID_LENGTH]


def asset_name(asset: str, partition: str | None = None) -> str:
    """``"checkpoint[phase1]"`` for a partitioned asset, ``"splits"`` otherwise."""
    return f"{asset}[{partition}]" if partition else asset


@dataclass(frozen=True)
class Record:
    """The lineage record of one materialised asset (partition)."""

    asset: str
    partition: str | None
    id: str
    inputs: dict[str, str]
    chain: dict[str, str]
    params: dict[str, Any]
    files: dict[str, str]
    directory: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return asset_name(self.asset, self.partition)

    def to_document(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "asset": self.asset,
            "partition": self.partition,
            "id": self.id,
            "inputs": dict(sorted(self.inputs.items())),
            "chain": dict(sorted(self.chain.items())),
            "params": self.params,
            "files": dict(sorted(self.files.items())),
            "extra": self.extra,
        }


def record_path(directory: str | Path) -> Path:
    return Path(directory) / RECORD_FILE


def make_record(
    directory: str | Path,
    asset: str,
    partition: str | None,
    inputs: Iterable[Record],
    params: Mapping[str, Any],
    files: Iterable[str | Path],
    id_parts: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Record:
    """Hash the step's outputs, parameters and inputs; write ``lineage.json`` last; return the record.

    ``files`` are paths inside ``directory`` (or absolute); their sha256 go into the id unless
    ``id_parts`` is given, which then replaces them as the step's own content (used where the
    content has a stronger address, e.g. the feature key).
    """
    directory = Path(directory)
    inputs = list(inputs)
    checksums = {}
    for f in files:
        path = Path(f) if Path(f).is_absolute() else directory / f
        checksums[path.relative_to(directory).as_posix() if path.is_relative_to(directory) else str(path)] = sha256_file(path)
    direct = {r.name: r.id for r in inputs}
    chain: dict[str, str] = {}
    for r in inputs:
        chain.update(r.chain)
    chain.update(direct)
    plain_params = jsonable(dict(params))
    own = id_parts if id_parts is not None else checksums
    rid = content_id(asset, partition, own, plain_params, dict(sorted(direct.items())))
    record = Record(asset, partition, rid, direct, chain, plain_params, checksums, directory, dict(extra or {}))
    write_json(record_path(directory), record.to_document(), schema="lineage")
    return record


def read_record(directory: str | Path, asset: str, partition: str | None = None) -> Record:
    """The current record of an asset; FileNotFoundError naming what to materialise when absent."""
    path = record_path(directory)
    name = asset_name(asset, partition)
    if not path.is_file():
        raise FileNotFoundError(f"{name} has no lineage record ({path} missing): materialise {name} first")
    try:
        doc = read_json(path, schema="lineage")
    except ArtifactError as exc:
        raise StaleInputError(name, [f"{name}: unreadable lineage record ({exc})"], [name]) from exc
    if doc.get("asset") != asset or doc.get("partition") != partition:
        raise StaleInputError(name, [f"{path} belongs to {asset_name(doc.get('asset'), doc.get('partition'))}"], [name])
    return Record(
        asset=doc["asset"], partition=doc["partition"], id=doc["id"], inputs=dict(doc["inputs"]),
        chain=dict(doc["chain"]), params=dict(doc["params"]), files=dict(doc["files"]), directory=Path(directory),
        extra=dict(doc.get("extra") or {}),
    )


def file_problems(record: Record) -> list[str]:
    """Recorded output files that are missing or whose checksum changed since the step wrote them."""
    problems = []
    for rel, digest in record.files.items():
        path = Path(rel) if Path(rel).is_absolute() else record.directory / rel
        if not path.is_file():
            problems.append(f"{record.name}: {path} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{record.name}: {path} changed since it was written (checksum mismatch)")
    return problems


def check_inputs(
    consumer: str,
    inputs: Iterable[Record],
    current: Callable[[str], Record | None],
    expected_params: Callable[[str], Mapping[str, Any] | None] | None = None,
) -> None:
    """Refuse stale inputs: raise :class:`StaleInputError` naming each stale asset.

    ``current(name)`` returns the current record of an asset by name (None when it has none);
    ``expected_params(name)`` the parameters the live config asks of it (None: not checked).
    """
    inputs = list(inputs)
    problems: list[str] = []
    rebuild: list[str] = []

    def stale(name: str, why: str, fix: str) -> None:
        problems.append(why)
        if fix not in rebuild:
            rebuild.append(fix)

    seen: dict[str, tuple[str, str]] = {}
    for r in inputs:
        for problem in file_problems(r):
            stale(r.name, problem, r.name)
        for ancestor, recorded in r.chain.items():
            other = seen.get(ancestor)
            if other is not None and other[0] != recorded:
                stale(ancestor, f"{r.name} and {other[1]} were made from different {ancestor} ({recorded} vs {other[0]})",
                      r.name)
            seen.setdefault(ancestor, (recorded, r.name))
            now = current(ancestor)
            if now is None:
                stale(ancestor, f"{r.name} was made from {ancestor} {recorded}, which no longer exists", ancestor)
            elif now.id != recorded:
                stale(ancestor, f"{r.name} was made from {ancestor} {recorded}, but {ancestor} is now {now.id}", r.name)
    if expected_params is not None:
        names = {r.name: r for r in inputs}
        for r in inputs:
            for ancestor in r.chain:
                if ancestor not in names:
                    rec = current(ancestor)
                    if rec is not None:
                        names[ancestor] = rec
        for name, rec in names.items():
            wanted = expected_params(name)
            if wanted is None:
                continue
            wanted = jsonable(dict(wanted))
            diffs = [
                f"{key}={rec.params.get(key)!r} (config now {value!r})"
                for key, value in sorted(wanted.items())
                if rec.params.get(key) != value
            ]
            if diffs:
                stale(name, f"{name} was made with {', '.join(diffs)}", name)
    if problems:
        raise StaleInputError(consumer, problems, rebuild)


def parse_name(name: str) -> tuple[str, str | None]:
    """``"checkpoint[phase1]"`` -> ``("checkpoint", "phase1")``; ``"splits"`` -> ``("splits", None)``."""
    if name.endswith("]") and "[" in name:
        asset, partition = name[:-1].split("[", 1)
        return asset, partition
    return name, None
