"""Byte-identical images in the labelled sources: found by content hash when the index is built.

Real photo collections hold copies of one file under several names. A copy is harmless inside
one split (it is kept once), harmful across splits (a validation image whose bytes are also
trained on, or pre-trained on, leaks into the model that validation then certifies) and a
contradiction when the copies carry different labels. :func:`resolve_duplicates` applies the
project's rule, as a pure function of the samples and their sha256:

- copies with conflicting labels anywhere (train or validation) are refused: nothing can say
  which label is right, so :class:`ConflictingDuplicatesError` lists every copy with its CSV line;
- copies inside the training sources are kept once (the first in source order);
- copies inside the validation source are kept once (the first), so two copies can never land in
  two different validation splits;
- a validation image whose bytes also appear among the training images, or in the ExPLoRA
  unlabeled folder, is dropped from validation (training on those is by design).

Every dropped sample is reported with its path, its CSV line and the path of the copy it
duplicates, so a user can clean the collection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stage1_core.data.datasets import Sample

__all__ = ["ConflictingDuplicatesError", "DroppedCopy", "DuplicateReport", "resolve_duplicates", "REPORT_COLUMNS"]

REPORT_COLUMNS = ("sha256", "reason", "dropped_id", "dropped_path", "dropped_line", "dropped_source",
                  "kept_path", "kept_line", "kept_source")


@dataclass(frozen=True)
class DroppedCopy:
    """One sample left out of the index because its image bytes are already represented."""

    sample: Sample
    origin: str
    sha256: str
    reason: str
    kept_path: Path
    kept_line: int | None
    kept_source: str

    def row(self) -> dict[str, str | int]:
        return {"sha256": self.sha256, "reason": self.reason, "dropped_id": self.sample.sample_id,
                "dropped_path": str(self.sample.path), "dropped_line": self.sample.line,
                "dropped_source": self.sample.source, "kept_path": str(self.kept_path),
                "kept_line": "" if self.kept_line is None else self.kept_line, "kept_source": self.kept_source}


@dataclass(frozen=True)
class DuplicateReport:
    """The samples kept per origin (``train``, ``val``) and every copy dropped, with why."""

    train: list[Sample]
    val: list[Sample]
    dropped: list[DroppedCopy]

    def count(self, reason: str) -> int:
        return sum(1 for d in self.dropped if d.reason == reason)


class ConflictingDuplicatesError(ValueError):
    """Byte-identical images carry different labels; lists every copy with its labels file and line."""


INSIDE_TRAIN = "copy inside the training sources (kept once)"
INSIDE_VAL = "copy inside the validation source (kept once)"
VAL_IN_TRAIN = "validation image also in the training sources (dropped from validation)"
VAL_IN_UNLABELED = "validation image also in the ExPLoRA unlabeled folder (dropped from validation)"


def _where(sample: Sample, labels_file_of: Mapping[str, str]) -> str:
    return f"{labels_file_of.get(sample.source, sample.source)}:{sample.line}: {sample.path} (label {sample.label})"


def resolve_duplicates(
    train: Sequence[Sample],
    val: Sequence[Sample],
    sha256: Mapping[str, str],
    unlabeled: Mapping[str, Path] | None = None,
    labels_file_of: Mapping[str, str] | None = None,
) -> DuplicateReport:
    """Apply the duplicate rule (module docstring) to samples whose image hashes are ``sha256[id]``.

    ``unlabeled`` maps the sha256 of each ExPLoRA unlabeled image to its path. ``labels_file_of``
    names each source's labels file in messages. Raises :class:`ConflictingDuplicatesError` when
    copies disagree on the label.
    """
    labels_file_of = dict(labels_file_of or {})
    unlabeled = dict(unlabeled or {})
    groups: dict[str, list[tuple[str, Sample]]] = {}
    for origin, samples in (("train", train), ("val", val)):
        for sample in samples:
            groups.setdefault(sha256[sample.sample_id], []).append((origin, sample))

    conflicts = [members for members in groups.values() if len({s.label for _, s in members}) > 1]
    if conflicts:
        lines = []
        for members in conflicts:
            lines.append(f"sha256 {sha256[members[0][1].sample_id][:16]}...: " + "; ".join(
                _where(s, labels_file_of) for _, s in members))
        raise ConflictingDuplicatesError(
            f"{len(conflicts)} image(s) appear as byte-identical copies with different labels - keep one copy "
            f"with the right label and remove the others from the labels CSV:\n  " + "\n  ".join(lines)
        )

    dropped: list[DroppedCopy] = []
    dropped_ids: set[str] = set()
    for digest, members in groups.items():
        if len(members) == 1 and digest not in unlabeled:
            continue
        train_copies = [s for origin, s in members if origin == "train"]
        val_copies = [s for origin, s in members if origin == "val"]
        for copy in train_copies[1:]:
            first = train_copies[0]
            dropped.append(DroppedCopy(copy, "train", digest, INSIDE_TRAIN, first.path, first.line, first.source))
        if not val_copies:
            continue
        if train_copies:
            first = train_copies[0]
            for copy in val_copies:
                dropped.append(DroppedCopy(copy, "val", digest, VAL_IN_TRAIN, first.path, first.line, first.source))
        elif digest in unlabeled:
            for copy in val_copies:
                dropped.append(DroppedCopy(copy, "val", digest, VAL_IN_UNLABELED, unlabeled[digest], None, "unlabeled"))
        else:
            first = val_copies[0]
            for copy in val_copies[1:]:
                dropped.append(DroppedCopy(copy, "val", digest, INSIDE_VAL, first.path, first.line, first.source))
    dropped_ids = {d.sample.sample_id for d in dropped}
    dropped.sort(key=lambda d: (d.origin, d.sample.source, d.sample.line))
    return DuplicateReport(
        train=[s for s in train if s.sample_id not in dropped_ids],
        val=[s for s in val if s.sample_id not in dropped_ids],
        dropped=dropped,
    )
