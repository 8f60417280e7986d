"""MicroBatcher: concurrent jobs share a batch, bounded by max_batch and max_wait; failures reach every job."""

from __future__ import annotations

import threading
import time

import pytest

from stage1_core.serving.batcher import BatcherBusy, BatcherStopped, MicroBatcher


class Recorder:
    """run_batch that doubles its items and records each batch (optionally blocking until released)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, items: list[int]):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5.0), "test never released the batch"
        self.batches.append(list(items))
        return "ctx", [2 * i for i in items]


def test_jobs_waiting_together_form_one_batch_and_get_their_own_results():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.05)
    try:
        first = batcher.submit([100])  # occupies the worker until released
        assert run.started.wait(5.0)
        futures = [batcher.submit([i, i + 1]) for i in range(0, 6, 2)]  # 6 items wait meanwhile
        gate.set()
        assert first.result(5.0) == ("ctx", [200], 1)
        results = [f.result(5.0) for f in futures]
    finally:
        batcher.stop()
    assert run.batches == [[100], [0, 1, 2, 3, 4, 5]]
    assert results == [("ctx", [0, 2], 6), ("ctx", [4, 6], 6), ("ctx", [8, 10], 6)]


def test_a_batch_never_exceeds_max_batch_by_combining_jobs():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.05)
    try:
        blocker = batcher.submit([0])
        assert run.started.wait(5.0)
        futures = [batcher.submit([1, 2, 3]), batcher.submit([4, 5]), batcher.submit([6]), batcher.submit([7, 8, 9, 10, 11])]
        gate.set()
        for future in [blocker, *futures]:
            future.result(5.0)
    finally:
        batcher.stop()
    assert run.batches == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]  # a job larger than max_batch runs alone
    assert all(len(b) <= 4 for b in run.batches[:-1])


def test_a_lone_request_waits_at_most_max_wait():
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=64, max_wait_s=0.05)
    try:
        start = time.perf_counter()
        assert batcher.submit([3]).result(5.0) == ("ctx", [6], 1)
        elapsed = time.perf_counter() - start
    finally:
        batcher.stop()
    assert elapsed < 2.0, f"a single request took {elapsed:.2f} s with max_wait 0.05 s"


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on():
    calls = []

    def run(items):
        calls.append(list(items))
        if -1 in items:
            raise RuntimeError("model exploded")
        return None, items

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            batcher.submit([-1]).result(5.0)
        assert batcher.submit([7]).result(5.0) == (None, [7], 1)
    finally:
        batcher.stop()

    def wrong_count(items):
        return None, items[:-1]

    batcher = MicroBatcher(wrong_count, max_batch=4, max_wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            batcher.submit([1, 2]).result(5.0)
    finally:
        batcher.stop()


def test_a_full_queue_is_refused_and_a_stopped_batcher_fails_waiting_jobs():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = MicroBatcher(run, max_batch=1, max_wait_s=0.0, max_queue=2)
    running = batcher.submit([1])
    assert run.started.wait(5.0)
    waiting = [batcher.submit([2]), batcher.submit([3])]
    with pytest.raises(BatcherBusy, match="2 requests are already waiting"):
        batcher.submit([4])
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.05)
    gate.set()
    stopper.join(10.0)
    assert running.result(5.0) == ("ctx", [2], 1)  # the batch in progress finishes
    for future in waiting:
        with pytest.raises(BatcherStopped):
            future.result(5.0)
    with pytest.raises(BatcherStopped):
        batcher.submit([5])


def test_a_cancelled_job_is_skipped():
    gate = threading.Event()
    run = Recorder(gate)
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.02)
    try:
        blocker = batcher.submit([0])
        assert run.started.wait(5.0)
        gone, kept = batcher.submit([1]), batcher.submit([2])
        assert gone.cancel()  # its caller timed out before the worker took it
        gate.set()
        blocker.result(5.0)
        assert kept.result(5.0) == ("ctx", [4], 1)
    finally:
        batcher.stop()
    assert run.batches == [[0], [2]]


@pytest.mark.parametrize("kwargs", [dict(max_batch=0), dict(max_wait_s=-1.0), dict(max_queue=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: (None, items), **kwargs)
