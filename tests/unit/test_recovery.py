"""stage1_assets.recovery: a run whose process was SIGKILLed is marked failed and its gpu slot freed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]

#: A run that claims the `gpu` pool slot in its only step, then dies with SIGKILL (no end event).
KILLED_RUN = """
import os, signal
import dagster as dg

@dg.op(pool="gpu")
def hold_gpu():
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

@dg.job(executor_def=dg.in_process_executor)
def killed():
    hold_gpu()

with dg.DagsterInstance.get() as instance:
    killed.execute_in_process(instance=instance)
"""


def test_a_killed_run_is_marked_failed_and_its_gpu_slot_freed(tmp_path, monkeypatch):
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRunStatus

    from stage1_assets.recovery import process_alive, reap_dead_runs

    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", KILLED_RUN], env=env, capture_output=True, text=True, timeout=240,
                           cwd=tmp_path)
    assert child.returncode == -signal.SIGKILL and "holding" in child.stdout, child.stderr[-3000:]
    assert not process_alive(2**22 + 12345)  # above the largest pid Linux hands out
    assert process_alive(os.getpid())

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # dagster.yaml's paths are relative to the project root
    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.STARTED
        assert [s.run_id for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots] == [run.run_id]
        messages = []
        assert reap_dead_runs(instance, log=messages.append) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
        assert "no longer exists" in messages[0] and "slots freed" in messages[0]
        assert reap_dead_runs(instance) == [], "a failed run is not reaped twice"
