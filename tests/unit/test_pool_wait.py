"""A run waiting for a pool slot sleeps until the next claim check (stage1_assets.pool_wait)."""

from __future__ import annotations

import time

import pytest

from stage1_assets import pool_wait


class Context:
    def __init__(self, timeouts: dict[str, float] | None) -> None:
        self._pending_timeouts = timeouts or {}

    def has_pending_claims(self) -> bool:
        return bool(self._pending_timeouts)


class Execution:
    def __init__(self, context: Context | None, steps: list[str]) -> None:
        self._instance_concurrency_context = context
        self.steps = steps

    def get_steps_to_execute(self, limit=None):
        return self.steps


def run(execution: Execution) -> tuple[list[str], list[float]]:
    slept: list[float] = []
    wrapped = pool_wait.with_backoff(Execution.get_steps_to_execute, sleep=slept.append)
    return wrapped(execution, limit=1), slept


def test_no_sleep_when_a_step_is_ready_or_nothing_waits():
    assert run(Execution(Context({"checkpoint": time.time() + 5}), ["predictions"])) == (["predictions"], [])
    assert run(Execution(Context(None), [])) == ([], [])
    assert run(Execution(None, [])) == ([], [])


def test_blocked_step_sleeps_until_its_next_claim_check_within_bounds():
    _, slept = run(Execution(Context({"checkpoint": time.time() + 0.2}), []))
    assert slept and 0.1 < slept[0] <= 0.2
    _, slept = run(Execution(Context({"checkpoint": time.time() + 30}), []))
    assert slept == [pool_wait.MAX_WAIT_S]
    _, slept = run(Execution(Context({"checkpoint": time.time() - 1}), []))  # check already due
    assert slept == [pool_wait.MIN_WAIT_S]


def test_seconds_to_next_claim_check_falls_back_when_private_state_changes():
    class Other:
        def has_pending_claims(self) -> bool:
            return True

    assert pool_wait.seconds_to_next_claim_check(Other()) == pool_wait.MAX_WAIT_S
    assert pool_wait.seconds_to_next_claim_check(Context({"a": 10.0, "b": 4.0}), now=1.0) == pytest.approx(3.0)


def test_install_wraps_dagsters_loop_once():
    from dagster._core.execution.plan.active import ActiveExecution

    installed = ActiveExecution.get_steps_to_execute
    original = getattr(installed, "__wrapped__", installed)
    ActiveExecution.get_steps_to_execute = original
    try:
        pool_wait.install()
        pool_wait.install()
        patched = ActiveExecution.get_steps_to_execute
        assert getattr(patched, "stage1_backoff", False) and patched.__wrapped__ is original
    finally:
        ActiveExecution.get_steps_to_execute = installed
