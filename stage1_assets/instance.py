"""Where this project's Dagster instance lives: ``DAGSTER_HOME`` is the project root.

The root's ``dagster.yaml`` is the instance file that ``make ui``, ``make demo`` and the
``dagster`` CLI read; it sends every piece of instance data (runs, event logs, schedules, compute
logs, local artifacts) into the git-ignored ``.dagster_home/`` under the root. Its paths are
relative, so Dagster must run with the project root as working directory: :func:`open_instance`
does that for in-process readers (tests, recovery).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: The folder under DAGSTER_HOME that holds all instance data (dagster.yaml's base_dir values).
INSTANCE_DATA = ".dagster_home"


def dagster_home() -> Path:
    """``$DAGSTER_HOME``, or the project root when it is not set."""
    return Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT)


def instance_data_dir(home: str | Path | None = None) -> Path:
    """``<DAGSTER_HOME>/.dagster_home``: the instance's data, and the demo's event logs."""
    return Path(home or dagster_home()) / INSTANCE_DATA


@contextlib.contextmanager
def open_instance(home: str | Path) -> Iterator[Any]:
    """The Dagster instance of the project rooted at ``home`` (DAGSTER_HOME and working directory set there)."""
    import dagster as dg

    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with contextlib.chdir(home), dg.DagsterInstance.get() as instance:
            yield instance
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old
