"""Two real ``dagster asset materialize`` processes on one project: writes never interleave.

Run A trains ``checkpoint[phase2]`` (every epoch: no early stop). While its step runs it holds
the ``gpu`` pool slot, the write lock of ``checkpoint[phase2]`` and read locks of its inputs
(:func:`stage1_core.locking.step_locks`, taken in ``run_step``), so:

* a second run writing the same partition waits: its ``checkpoint`` step is a ``gpu`` pool step,
  so Dagster holds it back until A's step ends, and it then trains on its own (the lock would
  refuse it at once, naming A's pid, were the step outside the pool - as in direct use of
  ``stage1_core``, see tests/unit/test_locking.py);
* a run whose step reads it (``predictions[phase2]``) is refused: it would read a checkpoint that
  changes under it;
* with ``STAGE1_LOCK_TIMEOUT`` that reader waits instead and then reads A's finished checkpoint;
* another phase runs at the same time where its inputs allow (``backbone[phase1]``), while
  its GPU step (``cached_features[phase1]``) waits for the ``gpu`` pool slot A holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, Project, clone_project, output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


#: What Dagster prints when the checkpoint step (not its checks) succeeded.
STEP_DONE = 'Finished execution of step "checkpoint"'
#: Every run a test started, so a failing test leaves no run behind (each has its own session).
STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def kill_leftover_runs():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def start(project: Project, select: str, partition: str, **env: str) -> subprocess.Popen:
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "stage1_assets.definitions", "--select", select,
            "--partition", partition]
    proc = subprocess.Popen(args, cwd=project.home, env={**project.env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 1800) -> subprocess.CompletedProcess:
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def wait_for_holder(lock: Path, proc: subprocess.Popen, timeout: float = 900) -> str:
    """The holder line run A writes into the lock file once its step holds the lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = lock.read_text() if lock.is_file() else ""
        if text.startswith("pid "):
            return text.strip()
        assert proc.poll() is None, f"run A ended before its step took the lock:\n{proc.stdout.read()}"
        time.sleep(0.2)
    raise AssertionError(f"{lock}: no holder after {timeout} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_same_partition_is_refused_or_waits_other_phases_run(tmp_path, phase1_project):
    # 150 epochs without early stop (~0.5 s each alone), so run A's training outlasts the other runs'
    # start-up (tens of seconds on two cores). It changes phase 1's training params too, so the
    # other phase's runs are steps that do not depend on them (backbone, cached_features).
    epochs = 150
    project = clone_project(phase1_project, tmp_path, epochs=epochs, early_stop_patience=epochs)
    artifacts = project.artifacts
    prepared = finish(start(project, "backbone,cached_features", "phase2"))
    assert prepared.returncode == 0, output(prepared)
    lock = artifacts / "checkpoint" / "phase2" / ".lock"

    writer = start(project, "checkpoint", "phase2")
    holder = wait_for_holder(lock, writer)
    second = start(project, "checkpoint", "phase2")
    reader = start(project, "predictions", "phase2")
    waiting_reader = start(project, "predictions", "phase2", STAGE1_LOCK_TIMEOUT="1800")
    other_phase = start(project, "backbone", "phase1")
    other_phase_gpu = start(project, "cached_features", "phase1")

    refused_reader = finish(reader)
    assert refused_reader.returncode != 0, output(refused_reader)
    assert f"checkpoint[phase2] is being written by another run ({holder})" in refused_reader.stdout, \
        output(refused_reader)
    assert "refusing to read it while it changes" in refused_reader.stdout
    # backbone is a GPU step too (ExPLoRA pre-training in phases 4 and 5), so the other phase's
    # backbone waits for the pool instead of running beside the training; it is checked below.
    # The run waiting for the gpu pool sleeps between claim checks instead of spinning a core
    # (stage1_assets.pool_wait; Dagster's loop alone would busy-wait).
    before, start_time = cpu_seconds(second.pid), time.monotonic()
    time.sleep(10)
    waiting_share = (cpu_seconds(second.pid) - before) / (time.monotonic() - start_time)
    assert second.poll() is None and waiting_share < 0.3, f"a run waiting for the pool used {waiting_share:.0%} of a core"

    # 150 epochs select another head than the default's 60, which may miss the accuracy criterion:
    # this test is about the writes, so it asks for the checkpoint step's success, not the checks'.
    written = finish(writer)
    assert STEP_DONE in written.stdout, output(written)
    queued = finish(second)
    assert STEP_DONE in queued.stdout, output(queued)
    assert "blocked by limit for pool gpu" in queued.stdout, "the same partition's writer waited for run A"
    waited = finish(waiting_reader)
    assert waited.returncode == 0, output(waited)
    gpu = finish(other_phase_gpu)
    assert gpu.returncode == 0, output(gpu)
    assert "blocked by limit for pool gpu" in gpu.stdout, "the gpu pool serialises GPU steps across runs"
    parallel = finish(other_phase)
    assert parallel.returncode == 0, output(parallel)
    assert "blocked by limit for pool gpu" in parallel.stdout, "backbone is in the gpu pool"

    from stage1_core.lineage import file_problems, read_record

    checkpoint = read_record(artifacts / "checkpoint" / "phase2", "checkpoint", "phase2")
    predictions = read_record(artifacts / "predictions" / "phase2", "predictions", "phase2")
    assert predictions.inputs["checkpoint[phase2]"] == checkpoint.id, "the waiting reader read A's result"
    assert file_problems(checkpoint) == [] and file_problems(predictions) == []
    training = json.loads((artifacts / "checkpoint" / "phase2" / "training.json").read_text())
    assert training["epochs_run"] == epochs, "one training ran to its end, nothing interleaved"
    assert lock.read_text() == "", "the lock is released"
