"""Recover from runs whose process died: mark them failed and free their concurrency slots.

A run started with ``dagster asset materialize`` executes in that process. When the process is
killed (SIGKILL, out of memory, a power cut), nothing records the end of the run: it stays
``STARTED`` in the run storage, and the ``gpu`` pool slot its step held stays claimed, so every
later ``cached_features`` or ``checkpoint`` step waits for ever ("Step blocked by limit for pool
gpu"). Dagster frees slots only for runs that ended (daemon ``free_slots_after_run_end_seconds``)
and its run monitoring cannot check the health of runs it did not launch.

:func:`reap_dead_runs` finds ``STARTED`` runs whose run process (the pid of their ``RUN_START``
event) no longer exists on this host, marks them failed with a message saying so, and frees
their slots. It only judges runs it can see: those recorded with this host name (tag
``stage1/host``, set by every step) or any run of a SQLite instance (one machine by
construction); a run on another machine is left alone. The code location's executor
(:mod:`stage1_assets.executor`) calls it when a run starts, before any step claims a slot, so the
next run after a crash just works; ``python -m stage1_assets.recovery`` does the same by hand.

    python -m stage1_assets.recovery        # uses $DAGSTER_HOME
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import dagster as dg

HOST_TAG = "stage1/host"


def process_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists on this host (a zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_pid(instance: Any, run_id: str) -> int | None:
    from dagster._core.events import DagsterEventType

    for entry in instance.all_logs(run_id, of_type=DagsterEventType.RUN_START):
        event = entry.dagster_event
        if event is not None and event.pid is not None:
            return int(event.pid)
    return None


def _single_host(instance: Any) -> bool:
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage

    storage = getattr(instance, "run_storage", None)
    inner = getattr(storage, "_storage", None)  # LegacyRunStorage wraps the real one
    return isinstance(storage, SqliteRunStorage) or isinstance(getattr(inner, "_run_storage", None), SqliteRunStorage)


def reap_dead_runs(instance: Any, log: Callable[[str], None] | None = None) -> list[str]:
    """Mark ``STARTED`` runs of this host whose process is gone as failed and free their slots; return their ids."""
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    host = socket.gethostname()
    local_only = _single_host(instance)
    reaped = []
    for run in instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        if not (local_only or run.tags.get(HOST_TAG) == host):
            continue
        pid = _run_pid(instance, run.run_id)
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        message = (
            f"run process (pid {pid} on {host}) no longer exists - killed or crashed; marked failed and its "
            f"concurrency slots freed by stage1_assets.recovery. Its partial outputs carry no lineage record "
            f"or a stale one, so they are never read as valid; materialise the assets again."
        )
        instance.report_run_failed(run, message)
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
        if log is not None:
            log(f"run {run.run_id}: {message}")
    return reaped


def tag_host(instance: Any, run_id: str) -> None:
    """Record this host on the run (once), so :func:`reap_dead_runs` on another host leaves it alone."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.tags.get(HOST_TAG) is None:
        instance.add_run_tags(run_id, {HOST_TAG: socket.gethostname()})


def main() -> int:
    with dg.DagsterInstance.get() as instance:
        reaped = reap_dead_runs(instance, log=print)
    print(f"{len(reaped)} dead run(s) marked failed and their slots freed" if reaped else "no dead runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

