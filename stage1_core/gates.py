"""Phase-gate verdicts: the outcome of one criterion, and whether a phase's gate counts as passed.

The criteria themselves (declaration, reader, pure rule) live in :mod:`stage1_core.acceptance`;
this module holds what they and the Dagster guards share, so it imports nothing heavy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateVerdict:
    """Outcome of one criterion: pass/fail, a one-line message, and the figures behind it."""

    criterion: str
    passed: bool
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", bool(self.passed))

    def describe(self) -> str:
        state = "passed" if self.passed else "FAILED"
        return f"{self.criterion} {state}: {self.message}"


def _finite(values: Iterable[Any]) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in values)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class CheckRecord:
    """The latest recorded evaluation of one gate check, as the cross-run guards see it.

    ``judged_id`` identifies the materialisation the evaluation judged and ``current_id`` the
    latest materialisation of that asset partition; they differ when the asset was rebuilt after
    the check ran, so the verdict no longer applies.
    """

    criterion: str
    passed: bool | None
    message: str = ""
    judged_id: int | None = None
    current_id: int | None = None


def gate_failures(expected: Sequence[str], records: Mapping[str, CheckRecord]) -> list[str]:
    """Every reason a phase gate does not count as passed, one line per criterion.

    A criterion fails when it was never evaluated, its asset was never materialised, its latest
    evaluation failed, or that evaluation judged an older materialisation than the current one. A
    phase whose gate lists no criteria cannot pass.
    """
    if not expected:
        return ["the phase's gate lists no criteria, so it cannot pass"]
    failures = []
    for name in expected:
        record = records.get(name)
        if record is None or record.passed is None:
            failures.append(f"{name}: never evaluated")
        elif record.current_id is None:
            failures.append(f"{name}: the asset it judges has no materialisation; materialise it and re-run the check")
        elif not record.passed:
            failures.append(f"{name}: failed ({record.message})" if record.message else f"{name}: failed")
        elif record.current_id is not None and record.judged_id != record.current_id:
            failures.append(
                f"{name}: its latest evaluation judged materialisation {record.judged_id}, "
                f"but the asset was rebuilt since (now {record.current_id}); re-run the check"
            )
    return failures
