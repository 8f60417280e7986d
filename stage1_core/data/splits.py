"""Train / val_select / val_calib / val_test splits, their ``splits.json`` and the rules of use.

``train`` is every sample of the training source(s). The validation source is divided by hashing:
a sample's position ``u = sha256(sample_id, seed) -> [0, 1)`` is compared with the cumulative
ratios, so its split depends on nothing but its own id and the seed. Adding or removing other
samples never moves it, and because the hash is independent of the label each class is split in
the given ratios in expectation (stratified without consulting any other sample).

Each split has one permitted role (``SPLIT_ROLES``). Fitting code checks the role of the data it
is handed by its content: :func:`split_of_ids` names the one split that holds every sample id of
an array (a mixture, or ids in no split, are refused), and :func:`require_role` refuses an array
whose split does not allow the role, so handing, say, val_test's rows to a calibrator fails loudly
whatever the array was called on the way.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from stage1_core.artifacts import read_json, write_json
from stage1_core.data.datasets import Sample

SCHEMA_VERSION = 1
HASH_METHOD = "sha256(utf8(sample_id) + b'\\x00' + utf8(str(seed)))[:8] / 2**64"
SPLIT_NAMES = ("train", "val_select", "val_calib", "val_test")
VAL_SPLITS = SPLIT_NAMES[1:]
SPLIT_ROLES: dict[str, str] = {
    "train": "fit",
    "val_select": "select",
    "val_calib": "calibrate",
    "val_test": "evaluate",
}
USAGE_RULES: dict[str, str] = {
    "train": "train: fitting model weights (head, adapters) only",
    "val_select": "val_select: checkpoint selection and early stopping only",
    "val_calib": "val_calib: fitting calibrators and exit policies only",
    "val_test": "val_test: final evaluation only",
}


class SplitError(ValueError):
    """A splits document is inconsistent, or a split is used for a role it does not allow."""


def require_split(name: str, role: str) -> None:
    """Raise :class:`SplitError` unless split ``name`` may be used for ``role``.

    Roles: ``fit`` (train), ``select`` (val_select), ``calibrate`` (val_calib), ``evaluate``
    (val_test).
    """
    if role not in SPLIT_ROLES.values():
        raise SplitError(f"unknown role {role!r} - use one of {', '.join(sorted(set(SPLIT_ROLES.values())))}")
    allowed = SPLIT_ROLES.get(name)
    if allowed is None:
        raise SplitError(f"unknown split {name!r} - use one of {', '.join(SPLIT_NAMES)}")
    if allowed != role:
        permitted = next(split for split, r in SPLIT_ROLES.items() if r == role)
        raise SplitError(
            f"split {name!r} may not be used to {role} ({USAGE_RULES[name]}); use {permitted!r} for that"
        )


def split_of_ids(sample_ids: Sequence[str], splits: "Splits", what: str = "the data") -> str:
    """The one split holding every id of ``sample_ids``: the content's tag, not a caller's name.

    Raises :class:`SplitError` when there are no ids, when some are in no split, or when they
    span several splits (a mixture has no single permitted role).
    """
    if len(sample_ids) == 0:
        raise SplitError(f"{what} has no sample ids, so its split cannot be told from its content")
    owners = Counter(splits.split_of(sid) for sid in sample_ids)
    unknown = owners.pop(None, 0)
    if unknown:
        first = next(sid for sid in sample_ids if splits.split_of(sid) is None)
        raise SplitError(f"{what}: {unknown} of {len(sample_ids)} sample ids are in no split (first: {first!r}) - "
                         f"the data do not belong to these splits; rebuild the splits or the data")
    if len(owners) > 1:
        mixture = ", ".join(f"{count} of {name}" for name, count in sorted(owners.items()))
        raise SplitError(f"{what} mixes splits ({mixture}): each split has its own role, so rows of different "
                         f"splits may not be fit together")
    return next(iter(owners))


def require_stored_as(sample_ids: Sequence[str], name: str, splits: "Splits", what: str, fix: str,
                      rows: str = "rows") -> str:
    """:func:`split_of_ids` of ``rows`` stored under split ``name``, refusing rows that are another split's."""
    holder = split_of_ids(sample_ids, splits, what)
    if holder != name:
        raise SplitError(f"{what}: the {rows} stored as {name!r} are of {holder}'s images; {fix}")
    return holder


def require_role(sample_ids: Sequence[str], role: str, splits: "Splits", what: str = "the data") -> str:
    """The split of ``sample_ids`` (by content), after checking that it may be used for ``role``."""
    name = split_of_ids(sample_ids, splits, what)
    try:
        require_split(name, role)
    except SplitError as exc:
        raise SplitError(f"{what} holds {len(sample_ids)} image(s) of {name}: {exc}") from None
    return name


def hash_position(sample_id: str, seed: int) -> float:
    """Deterministic position of a sample in ``[0, 1)`` (same on every machine and Python run)."""
    digest = hashlib.sha256(sample_id.encode("utf-8") + b"\x00" + str(int(seed)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    if len(ratios) != 3:
        raise SplitError(f"ratios {tuple(ratios)} must have 3 entries (val_select, val_calib, val_test)")
    values = tuple(float(r) for r in ratios)
    if any(not (0.0 < r < 1.0) for r in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise SplitError(f"ratios {values} must each be in (0, 1) and sum to 1")
    return values  # type: ignore[return-value]


def assign_val_split(sample_id: str, seed: int, ratios: Sequence[float]) -> str:
    """The validation split of ``sample_id``: its hash position against the cumulative ratios."""
    select, calib, _ = _check_ratios(ratios)
    u = hash_position(sample_id, seed)
    if u < select:
        return "val_select"
    if u < select + calib:
        return "val_calib"
    return "val_test"


@dataclass(frozen=True)
class Splits:
    """Sample ids per split plus the seed, ratios and per-split class and source counts."""

    seed: int
    ratios: tuple[float, float, float]
    ids: Mapping[str, tuple[str, ...]]
    class_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    source_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r} - use one of {', '.join(SPLIT_NAMES)}")
        return self.ids[name]

    @property
    def train(self) -> tuple[str, ...]:
        return self.ids["train"]

    @property
    def val_select(self) -> tuple[str, ...]:
        return self.ids["val_select"]

    @property
    def val_calib(self) -> tuple[str, ...]:
        return self.ids["val_calib"]

    @property
    def val_test(self) -> tuple[str, ...]:
        return self.ids["val_test"]

    @cached_property
    def _owner(self) -> dict[str, str]:
        return {sid: name for name in SPLIT_NAMES for sid in self.ids[name]}

    def split_of(self, sample_id: str) -> str | None:
        """The split holding ``sample_id`` (``None`` if it is in none)."""
        return self._owner.get(sample_id)

    def select(self, name: str, samples: Iterable[Sample]) -> list[Sample]:
        """The samples of split ``name`` among ``samples``, in the split's order."""
        by_id = {s.sample_id: s for s in samples}
        missing = [sid for sid in self[name] if sid not in by_id]
        if missing:
            raise SplitError(
                f"{len(missing)} sample id(s) of split {name!r} are not in the given samples "
                f"(first: {missing[:5]}) - the splits do not belong to this data set; rebuild them"
            )
        return [by_id[sid] for sid in self[name]]

    def to_document(self) -> dict[str, Any]:
        """The ``splits.json`` document (see ``schemas/splits.schema.json``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "seed": self.seed,
            "ratios": dict(zip(VAL_SPLITS, self.ratios)),
            "assignment": HASH_METHOD,
            "splits": {
                name: {
                    "role": SPLIT_ROLES[name],
                    "usage": USAGE_RULES[name],
                    "n": len(self.ids[name]),
                    "class_counts": {k: int(v) for k, v in self.class_counts[name].items()},
                    "source_counts": {k: int(v) for k, v in self.source_counts[name].items()},
                    "sample_ids": list(self.ids[name]),
                }
                for name in SPLIT_NAMES
            },
        }


def _counts(samples: Sequence[Sample]) -> tuple[dict[str, int], dict[str, int]]:
    labels = Counter(str(s.label) for s in samples)
    sources = Counter(s.source for s in samples)
    return {"0": labels.get("0", 0), "1": labels.get("1", 0)}, dict(sorted(sources.items()))


def make_splits(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    seed: int,
    ratios: Sequence[float] = (0.33, 0.33, 0.34),
) -> Splits:
    """Split: all training samples to ``train``; validation samples by :func:`assign_val_split`."""
    ratios = _check_ratios(ratios)
    train_ids = [s.sample_id for s in train_samples]
    val_ids = [s.sample_id for s in val_samples]
    problems = []
    for label, ids in (("training", train_ids), ("validation", val_ids)):
        dupes = [sid for sid, n in Counter(ids).items() if n > 1]
        if dupes:
            problems.append(f"{len(dupes)} duplicate sample id(s) in the {label} samples (first: {dupes[:5]})")
    shared = sorted(set(train_ids) & set(val_ids))
    if shared:
        problems.append(
            f"{len(shared)} sample id(s) appear in both training and validation sources (first: {shared[:5]}) - "
            f"give the sources distinct names or image paths so ids are unique"
        )
    if problems:
        raise SplitError("; ".join(problems))
    members: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
    members["train"] = list(train_samples)
    for sample in val_samples:
        members[assign_val_split(sample.sample_id, seed, ratios)].append(sample)
    class_counts, source_counts = {}, {}
    for name in SPLIT_NAMES:
        class_counts[name], source_counts[name] = _counts(members[name])
    return Splits(
        seed=int(seed),
        ratios=ratios,
        ids={name: tuple(s.sample_id for s in members[name]) for name in SPLIT_NAMES},
        class_counts=class_counts,
        source_counts=source_counts,
    )


def _consistency_problems(doc: Mapping[str, Any], known_ids: Iterable[str] | None) -> list[str]:
    problems: list[str] = []
    splits = doc["splits"]
    ratios = tuple(doc["ratios"][name] for name in VAL_SPLITS)
    ratios_ok = True
    try:
        _check_ratios(ratios)
    except SplitError as exc:
        ratios_ok = False
        problems.append(f"$.ratios: {exc}")
    owner: dict[str, str] = {}
    for name in SPLIT_NAMES:
        entry = splits[name]
        ids = entry["sample_ids"]
        if entry["n"] != len(ids):
            problems.append(f"$.splits.{name}.n: {entry['n']} but {len(ids)} sample ids are listed")
        if sum(entry["class_counts"].values()) != len(ids):
            problems.append(f"$.splits.{name}.class_counts: sum {sum(entry['class_counts'].values())} != {len(ids)} ids")
        if sum(entry["source_counts"].values()) != len(ids):
            problems.append(f"$.splits.{name}.source_counts: sum {sum(entry['source_counts'].values())} != {len(ids)} ids")
        overlap = [sid for sid in ids if sid in owner]
        if overlap:
            problems.append(
                f"$.splits.{name}.sample_ids: {len(overlap)} id(s) also in {owner[overlap[0]]!r} "
                f"(first: {overlap[:5]}) - splits must be disjoint"
            )
        for sid in ids:
            owner.setdefault(sid, name)
        if name != "train" and ratios_ok:
            moved = [sid for sid in ids if assign_val_split(sid, doc["seed"], ratios) != name]
            if moved:
                problems.append(
                    f"$.splits.{name}.sample_ids: {len(moved)} id(s) are not where the hash with seed "
                    f"{doc['seed']} puts them (first: {moved[:5]}) - the file was edited; rebuild it with make_splits"
                )
    if known_ids is not None:
        known = set(known_ids)
        unknown = [sid for sid in owner if sid not in known]
        if unknown:
            problems.append(
                f"{len(unknown)} sample id(s) are not in the data set (first: {unknown[:5]}) - "
                f"the splits belong to other data; rebuild them"
            )
    return problems


def splits_from_document(doc: Mapping[str, Any]) -> Splits:
    """Build :class:`Splits` from a schema-valid document (no consistency checks)."""
    return Splits(
        seed=int(doc["seed"]),
        ratios=tuple(float(doc["ratios"][name]) for name in VAL_SPLITS),  # type: ignore[arg-type]
        ids={name: tuple(doc["splits"][name]["sample_ids"]) for name in SPLIT_NAMES},
        class_counts={name: dict(doc["splits"][name]["class_counts"]) for name in SPLIT_NAMES},
        source_counts={name: dict(doc["splits"][name]["source_counts"]) for name in SPLIT_NAMES},
    )


def save_splits(splits: Splits, path: str | Path) -> Path:
    """Write ``splits.json`` atomically after checking it (schema and consistency)."""
    doc = splits.to_document()
    problems = _consistency_problems(doc, None)
    if problems:
        raise SplitError(f"{path}: refusing to write inconsistent splits:\n  " + "\n  ".join(problems))
    return write_json(path, doc, schema="splits")


def load_splits(path: str | Path, known_ids: Iterable[str] | None = None) -> Splits:
    """Read ``splits.json``; check schema, disjointness, counts, hash placement, known ids."""
    doc = read_json(path, schema="splits")
    problems = _consistency_problems(doc, known_ids)
    if problems:
        raise SplitError(f"{path}: invalid splits file:\n  " + "\n  ".join(problems))
    return splits_from_document(doc)
