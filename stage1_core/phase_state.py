"""Explicit skips of optional phases (phase 5): who skipped it, when and why.

An optional phase is either *not attempted* (never trained), *attempted* (its gate decides) or
*skipped* (a person said so, with a reason). A skip is a small JSON record under
``<artifacts>/phase_state/<phase>.skip.json``; ``stage1 phase skip phase5 --reason TEXT`` and the
Dagster job ``skip_phase5`` both write it, and ``stage1 phase unskip phase5`` removes it. The
guard of a later phase reads it: phase 6 waits for an attempted phase 5 to pass, unless phase 5
is skipped.
"""

from __future__ import annotations

import datetime as _dt
import getpass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stage1_core.artifacts import read_json, write_json
from stage1_core.lineage import record_path
from stage1_core.phases import PHASES, phase_number, previous_phases

STATE_DIR = "phase_state"


def _skip_path(root: Path, partition: str) -> Path:
    return root / STATE_DIR / f"{partition}.skip.json"


def _root(layout: Any) -> Path:
    """The artifacts root of a :class:`~stage1_core.steps.context.Layout` or of a path (a Path's own
    ``.root`` is its anchor, "/", so paths are taken as they are)."""
    if isinstance(layout, (str, Path)):
        return Path(layout)
    return Path(layout.root)


def skip_phase(layout: Any, partition: str, reason: str, by: str | None = None) -> dict[str, Any]:
    """Record that optional phase ``partition`` is skipped; refuse non-optional phases and empty reasons."""
    recipe = PHASES[phase_number(partition)]
    if not recipe.optional:
        optional = [r.key for r in PHASES.values() if r.optional]
        raise ValueError(f"{recipe.key} is not optional and cannot be skipped (optional phases: {optional})")
    if not reason or not reason.strip():
        raise ValueError(f"skipping {recipe.key} needs a reason (--reason TEXT): it is shown wherever the phase is")
    record = {
        "phase": recipe.key,
        "reason": reason.strip(),
        "by": by or getpass.getuser(),
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(_skip_path(_root(layout), recipe.key), record)
    return record


def unskip_phase(layout: Any, partition: str) -> bool:
    """Remove a skip record; True when there was one."""
    path = _skip_path(_root(layout), PHASES[phase_number(partition)].key)
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def read_skip(layout: Any, partition: str) -> dict[str, Any] | None:
    """The skip record of ``partition``, or None when it is not skipped."""
    path = _skip_path(_root(layout), PHASES[phase_number(partition)].key)
    return read_json(path) if path.is_file() else None


def reference_phase(layout: Any, number: int, asset: str = "evaluation") -> str | None:
    """The phase a regression is measured against: the latest earlier phase with that asset.

    Phase 5 is optional, so phase 6 compares with phase 5 only when phase 5 was evaluated and is
    not skipped (a skipped phase is never a reference, whatever it left behind).
    """
    for earlier in range(number - 1, 0, -1):
        key = PHASES[earlier].key
        if PHASES[earlier].optional and read_skip(layout, key) is not None:
            continue
        if record_path(layout.path(asset, key)).is_file():
            return key
    return None


def optional_phase_hint(key: str) -> str:
    """How out of a failed gate of an attempted optional phase: make it pass, or skip it."""
    return (f"{key} is optional and was attempted: make its gate pass (make demo PHASE={key}), or "
            f"skip it explicitly: stage1 phase skip {key} --reason TEXT (or the skip_{key} job)")


def prerequisite_failures(partition: str, attempted: set[int], failures_by_phase: Mapping[str, Sequence[str]]) -> list[str]:
    """Why ``partition`` may not train yet: the failing gate lines of every phase it builds on.

    The one rule both guards apply (Dagster's over its check records, the command line's over the
    verdicts recorded in the artifacts root). ``attempted`` holds the optional phases that were
    attempted and not skipped; ``failures_by_phase`` maps a phase key to its gate's failure lines
    (:func:`stage1_core.gates.gate_failures`). Pure: no file is read.
    """
    failures: list[str] = []
    for number in previous_phases(phase_number(partition), attempted):
        key = PHASES[number].key
        lines = [f"{key}.{line}" for line in failures_by_phase.get(key, ["its gate was never evaluated"])]
        if lines and PHASES[number].optional:
            lines.append(optional_phase_hint(key))
        failures.extend(lines)
    return failures


def attempted_optional_phases(layout: Any) -> set[int]:
    """Optional phases attempted in this artifacts root (a checkpoint record) and not skipped."""
    root = _root(layout)
    return {
        number for number, recipe in PHASES.items()
        if recipe.optional and read_skip(root, recipe.key) is None
        and record_path(root / "checkpoint" / recipe.key).is_file()
    }


def recorded_gate_failures(layout: Any, partition: str) -> list[str]:
    """:func:`~stage1_core.gates.gate_failures` of ``partition`` from the verdicts recorded in the
    artifacts root (``gates/<phase>/<criterion>.json``): a verdict counts only while the asset it
    judged is still the current materialisation, as a Dagster check record does."""
    from stage1_core.gates import CheckRecord, gate_failures
    from stage1_core.layout import Layout
    from stage1_core.store import current_id, read_verdicts

    store = layout if isinstance(layout, Layout) else Layout(_root(layout))
    records = {}
    for name, doc in read_verdicts(store, partition, current_only=False).items():
        asset = doc.get("asset")
        current = current_id(store, asset, partition) if asset is not None else doc.get("judged_id")
        records[name] = CheckRecord(name, doc.get("passed"), doc.get("message", ""), doc.get("judged_id"), current)
    expected = [c.name for c in PHASES[phase_number(partition)].criteria]
    return gate_failures(expected, records)


def root_prerequisite_failures(layout: Any, partition: str) -> list[str]:
    """:func:`prerequisite_failures` of ``partition`` over the gates recorded in the artifacts root."""
    attempted = attempted_optional_phases(layout)
    needed = previous_phases(phase_number(partition), attempted)
    return prerequisite_failures(
        partition, attempted, {PHASES[n].key: recorded_gate_failures(layout, PHASES[n].key) for n in needed}
    )
