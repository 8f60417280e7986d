"""asset_lock: two real processes writing the same asset partition cannot interleave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stage1_core.locking import LOCK_TIMEOUT_ENV, AssetLockedError, asset_lock, default_timeout, lock_path, step_locks

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

#: A child that takes the lock, says so, then holds it for ``hold`` seconds while appending lines.
HOLDER = """
import sys, time
from stage1_core.locking import asset_lock, AssetLockedError
root, asset, partition, hold, timeout, tag, log = sys.argv[1:8]
try:
    with asset_lock(root, asset, partition, timeout=float(timeout)):
        print("locked", flush=True)
        for i in range(5):
            with open(log, "a") as f:
                f.write(f"{tag} {i}\\n")
            time.sleep(float(hold) / 5)
except AssetLockedError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def spawn(root: Path, hold: float, timeout: float = 0.0, tag: str = "a", log: Path | None = None, partition: str = "phase1"):
    log = log or root / "log.txt"
    args = [sys.executable, "-c", HOLDER, str(root), "checkpoint", partition, str(hold), str(timeout), tag, str(log)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_locked(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "locked", (line, proc.stderr.read() if proc.poll() is not None else "")


def test_second_process_is_refused_naming_asset_partition_and_holder(tmp_path):
    holder = spawn(tmp_path, hold=5.0)
    try:
        wait_locked(holder)
        second = spawn(tmp_path, hold=0.0, tag="b")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 3, err
        assert "checkpoint[phase1] is being written by another run" in err
        assert f"pid {holder.pid} " in err
        assert str(lock_path(tmp_path, "checkpoint", "phase1")) in err
        with pytest.raises(AssetLockedError, match=rf"checkpoint\[phase1\].*pid {holder.pid} "):
            with asset_lock(tmp_path, "checkpoint", "phase1"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert "b " not in (tmp_path / "log.txt").read_text()


def test_other_partitions_and_assets_are_independent(tmp_path):
    holder = spawn(tmp_path, hold=5.0)
    try:
        wait_locked(holder)
        with asset_lock(tmp_path, "checkpoint", "phase2"), asset_lock(tmp_path, "predictions", "phase1"):
            pass
        with asset_lock(tmp_path, "splits"):
            assert (tmp_path / "splits" / ".lock").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_waiting_writer_runs_after_the_holder_without_interleaving(tmp_path):
    log = tmp_path / "log.txt"
    first = spawn(tmp_path, hold=1.5, tag="a", log=log)
    wait_locked(first)
    second = spawn(tmp_path, hold=0.5, timeout=30.0, tag="b", log=log)
    assert first.wait(timeout=60) == 0
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    tags = [line.split()[0] for line in log.read_text().splitlines()]
    assert tags == ["a"] * 5 + ["b"] * 5, tags


def test_waiting_gives_up_after_the_timeout(tmp_path):
    holder = spawn(tmp_path, hold=10.0)
    try:
        wait_locked(holder)
        start = time.monotonic()
        with pytest.raises(AssetLockedError, match=r"after waiting \d"):
            with asset_lock(tmp_path, "checkpoint", "phase1", timeout=0.5):
                pass
        assert 0.4 < time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = spawn(tmp_path, hold=30.0)
    wait_locked(holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with asset_lock(tmp_path, "checkpoint", "phase1") as path:
        assert f"pid {os.getpid()} " in path.read_text()
    assert path.read_text() == "", "the holder line is cleared on release"


def test_names_must_be_single_path_components(tmp_path):
    for asset, partition in (("..", "phase1"), ("checkpoint", "../x"), ("a/b", None), ("", None)):
        with pytest.raises(ValueError, match="single path component"):
            lock_path(tmp_path, asset, partition)


def test_readers_share_and_a_writer_is_refused_while_one_reads(tmp_path):
    with asset_lock(tmp_path, "checkpoint", "phase1", shared=True), asset_lock(tmp_path, "checkpoint", "phase1", shared=True):
        with pytest.raises(AssetLockedError, match=r"checkpoint\[phase1\] is being read by another run"):
            with asset_lock(tmp_path, "checkpoint", "phase1"):
                pass
    holder = spawn(tmp_path, hold=5.0)
    try:
        wait_locked(holder)
        with pytest.raises(AssetLockedError, match=rf"being written by another run \(pid {holder.pid} .*refusing to read"):
            with asset_lock(tmp_path, "checkpoint", "phase1", shared=True):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_step_locks_write_own_partition_and_read_inputs(tmp_path):
    inputs = [("cached_features", "phase1"), ("splits", None)]
    with step_locks(tmp_path, "checkpoint", "phase1", inputs, timeout=0):
        with asset_lock(tmp_path, "cached_features", "phase1", shared=True):
            pass  # another reader of an input is fine
        for asset, partition in [("checkpoint", "phase1"), *inputs]:
            with pytest.raises(AssetLockedError):
                with asset_lock(tmp_path, asset, partition):
                    pass
        with asset_lock(tmp_path, "checkpoint", "phase2"):
            pass
    with asset_lock(tmp_path, "checkpoint", "phase1"), asset_lock(tmp_path, "splits"):
        pass  # all released


def test_lock_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    assert default_timeout() == 0.0
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "2.5")
    assert default_timeout() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=LOCK_TIMEOUT_ENV):
            default_timeout()
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.3")
    with asset_lock(tmp_path, "predictions", "phase1"):
        start = time.monotonic()
        with pytest.raises(AssetLockedError, match=r"after waiting 0\.[3-9]"):
            with step_locks(tmp_path, "predictions", "phase1"):
                pass
        assert time.monotonic() - start >= 0.3


# ----- lock ordering, stale holders, the locks a step takes through StepContext ----------------


def test_lock_plan_is_sorted_and_a_written_input_is_locked_once_exclusively(tmp_path):
    from stage1_core.locking import lock_plan

    plan = lock_plan(tmp_path, [("predictions", "phase1")],
                     [("splits", None), ("checkpoint", "phase1"), ("predictions", "phase1"), ("cached_features", "phase1")])
    assert [p.path for p in plan] == sorted(p.path for p in plan)
    assert [(p.name, p.shared) for p in plan] == [
        ("cached_features", True), ("checkpoint", True), ("predictions", False), ("splits", True)]
    # Two steps with overlapping lock sets take the common locks in the same order (no deadlock cycle).
    other = lock_plan(tmp_path, [("evaluation", "phase1")], [("predictions", "phase1"), ("checkpoint", "phase1")])
    common = [p.path for p in plan if p.path in {q.path for q in other}]
    assert common == [p.path for p in other if p.path in set(common)]


def test_a_dead_writers_leftover_line_is_not_reported_as_the_holder(tmp_path):
    """A writer killed before clearing its line leaves 'pid N' behind; a refusal must not name it."""
    import socket

    path = lock_path(tmp_path, "checkpoint", "phase1")
    path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()} since 2026-01-01T00:00:00+00:00\n")
    with asset_lock(tmp_path, "checkpoint", "phase1", shared=True):  # a reader holds it now
        with pytest.raises(AssetLockedError) as info:
            with asset_lock(tmp_path, "checkpoint", "phase1"):
                pass
    assert f"pid {dead.stdout.strip()}" not in str(info.value)
    assert "being read" in str(info.value)


def _context(tmp_path):
    from stage1_core.config import Stage1ProConfig
    from stage1_core.steps.context import Layout, StepContext

    return StepContext(Stage1ProConfig(data_source="synthetic"), Layout(tmp_path), "phase1")


def test_step_context_locks_exactly_what_require_names_and_what_the_step_writes(tmp_path):
    """The evaluation step reads predictions, checkpoint and features: a writer of any of them is refused."""
    ctx = _context(tmp_path)
    needs = [("exit_policy", "phase1"), ("predictions", "phase1"), ("checkpoint", "phase1"), ("cached_features", "phase1")]
    with asset_lock(tmp_path, "checkpoint", "phase1"):  # another run is writing the checkpoint
        with pytest.raises(AssetLockedError, match=r"checkpoint\[phase1\] is being written"):
            ctx.require("evaluation", needs)
    assert ctx._locks is None, "a refused step holds none of its locks"
    with pytest.raises(FileNotFoundError):  # locks taken, then the missing records are reported
        ctx.require("evaluation", needs)
    for name, part in needs:  # held shared: readers pass, writers are refused
        with asset_lock(tmp_path, name, part, shared=True):
            pass
        with pytest.raises(AssetLockedError):
            with asset_lock(tmp_path, name, part):
                pass
    with pytest.raises(AssetLockedError):  # its own output is held exclusively
        with asset_lock(tmp_path, "evaluation", "phase1", shared=True):
            pass
    with asset_lock(tmp_path, "bundle", "phase1"):  # not named by require: not locked
        pass
    ctx.close()
    with asset_lock(tmp_path, "checkpoint", "phase1"), asset_lock(tmp_path, "evaluation", "phase1"):
        pass


def test_lock_scope_releases_the_locks_of_a_step_that_raised(tmp_path):
    from stage1_core.locking import lock_scope

    def failing_step():
        ctx = _context(tmp_path)
        ctx.require("predictions", [("checkpoint", "phase1")])

    with lock_scope():
        with pytest.raises(FileNotFoundError):
            failing_step()
    with asset_lock(tmp_path, "predictions", "phase1"), asset_lock(tmp_path, "checkpoint", "phase1"):
        pass


def test_gate_verdict_file_is_written_under_its_lock(tmp_path):
    from stage1_core.acceptance.verdicts import gate_lock_path, record_verdict
    from stage1_core.gates import GateVerdict
    from stage1_core.locking import path_lock
    from stage1_core.steps.context import Layout

    layout = Layout(tmp_path)
    verdict = GateVerdict("val_test_check", True, "ok", {})
    target = layout.dir("gates", "phase1") / "val_test_check.json"
    with path_lock(gate_lock_path(target), "gate"):
        with pytest.raises(AssetLockedError):
            record_verdict(layout, "phase1", verdict)
    assert not target.exists()
    record_verdict(layout, "phase1", verdict)
    assert target.is_file()


def test_a_step_without_inputs_still_takes_its_write_lock(tmp_path, monkeypatch):
    """backbone[phase1] (source weights) requires nothing, yet a second writer must be refused."""
    from stage1_core.config import Stage1ProConfig
    from stage1_core.steps.backbone import prepare_backbone
    from stage1_core.steps.context import Layout

    monkeypatch.setattr("stage1_core.model.backbone.resolve_backbone", lambda path, root: tmp_path / "weights")
    with asset_lock(tmp_path, "backbone", "phase1"):
        with pytest.raises(AssetLockedError, match=r"backbone\[phase1\] is being written"):
            prepare_backbone(Stage1ProConfig(data_source="synthetic"), Layout(tmp_path), "phase1")


def test_a_hold_taken_on_a_lock_file_removed_meanwhile_moves_to_the_current_file(tmp_path, monkeypatch):
    """The race CI once hit: a reader opens a version's lock file, a publish removes the version and
    its lock file, a later publish brings the same version back; the reader's flock on the orphan
    inode must not count as a hold, or the next remover takes a fresh lock file and deletes the
    version under the reader."""
    import fcntl

    from stage1_core import locking
    from stage1_core.locking import remove_unheld, version_hold

    version = tmp_path / "versions" / "abc"
    version.mkdir(parents=True)
    (version / "bundle.json").write_text("{}")
    real_flock, interleaved = fcntl.flock, []

    def flock_after_a_publish_interleaves(fd, op):
        if op & fcntl.LOCK_SH and not interleaved:
            interleaved.append(True)
            assert remove_unheld(version)  # the old lock file is unlinked with the version
            version.mkdir()  # a later publish of the same id brings the version back
            (version / "bundle.json").write_text("{}")
        return real_flock(fd, op)

    monkeypatch.setattr(locking.fcntl, "flock", flock_after_a_publish_interleaves)
    with version_hold(version):
        assert interleaved
        assert not remove_unheld(version), "the hold sat on an unlinked lock file: the version was removed under it"
        assert (version / "bundle.json").is_file()
    assert remove_unheld(version)
