"""Make a run whose step waits for a ``gpu`` pool slot sleep instead of spinning.

Dagster 1.13's executors (in-process and multiprocess) ask ``ActiveExecution.get_steps_to_execute`` for work in a
loop; while a step is blocked by a pool limit and no other step of the run is running, the loop
has nothing to wait on, and ``InstanceConcurrencyContext.interval_to_next_pending_claim_check``
returns ``min([0, ...]) <= 0``, so the run never sleeps: it spins a whole core until the slot
frees (the slot claims themselves are rate-limited; the loop is not). On two cores, two waiting
runs starve the one that holds the slot. Dagster's own fix was proposed and not merged
(dagster-io/dagster#20367, "fix pending claim check sleep intervals").

:func:`install` wraps ``get_steps_to_execute``: when it returns no step while claims are pending,
it sleeps until the next claim check is due, at most ``MAX_WAIT_S`` (so the events of steps that
do run are still read promptly). It relies on two private attributes and degrades to a fixed
short sleep if they change; the executor of this code location installs it
(:mod:`stage1_assets.executor`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

#: Longest sleep between two looks for work while a step waits for a pool slot.
MAX_WAIT_S = 0.5
#: Shortest sleep, so a claim check that is already due does not turn into a spin either.
MIN_WAIT_S = 0.05


def seconds_to_next_claim_check(context: Any, now: float | None = None) -> float | None:
    """Seconds until ``context`` (an ``InstanceConcurrencyContext``) re-checks a blocked claim.

    None when no claim is pending; ``MAX_WAIT_S`` when the private timing state is unavailable.
    """
    if context is None or not context.has_pending_claims():
        return None
    timeouts = getattr(context, "_pending_timeouts", None)
    if not isinstance(timeouts, dict) or not timeouts:
        return MAX_WAIT_S
    now = time.time() if now is None else now
    return min(timeouts.values()) - now


def with_backoff(get_steps: Callable[..., Any], sleep: Callable[[float], None] = time.sleep) -> Callable[..., Any]:
    """``get_steps_to_execute`` that sleeps when it has no step to give while claims are pending."""

    @functools.wraps(get_steps)
    def get_steps_to_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        steps = get_steps(self, *args, **kwargs)
        if not steps:
            wait = seconds_to_next_claim_check(getattr(self, "_instance_concurrency_context", None))
            if wait is not None:
                sleep(min(MAX_WAIT_S, max(MIN_WAIT_S, wait)))
        return steps

    get_steps_to_execute.stage1_backoff = True  # type: ignore[attr-defined]
    return get_steps_to_execute


def install() -> None:
    """Wrap ``ActiveExecution.get_steps_to_execute`` once per process."""
    from dagster._core.execution.plan.active import ActiveExecution

    if not getattr(ActiveExecution.get_steps_to_execute, "stage1_backoff", False):
        ActiveExecution.get_steps_to_execute = with_backoff(ActiveExecution.get_steps_to_execute)
