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
from pathlib import Path
from typing import Any

from stage1_core.artifacts import read_json, write_json
from stage1_core.lineage import record_path
from stage1_core.phases import PHASES, phase_number

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
