"""How a run executes its steps: in the run's own process (default) or one process per step.

``in_process`` (the default): every step and check runs in the run's process, so a step starts
in milliseconds and torch, transformers and scikit-learn load once per run, in the first step
that uses them (the code location itself imports none of them: :mod:`stage1_core.pipeline`). The
pipeline is a chain (data, features, training, policy, evaluation, bundle) whose only parallel
steps are its checks, which take well under a second each, so one process loses nothing on one
machine; measured with ``benchmarks/bench_demo.py`` (README, "Dagster's share of the wall time").

``multiprocess``: one process per step, forked from a forkserver that preloads this code location
and every step module (unless ``start_method`` is given), for step isolation or concurrent steps
on a bigger machine. The forkserver pays the imports once per run (about 7 s on 2 cores) and
each step about 0.5 s to start::

    execution:
      config:
        multiprocess: {}

Either way the executor first reaps runs whose process died (:mod:`stage1_assets.recovery`),
makes a step waiting for the ``gpu`` pool sleep (:mod:`stage1_assets.pool_wait`) and lets the
run's process exit without collecting its heap (:mod:`stage1_assets.fast_exit`); both executors
respect the pool.
"""

from __future__ import annotations

import sys
from typing import Any

import dagster as dg

from stage1_core.pipeline import STEP_MODULES

#: Modules the forkserver imports once, so a forked step does not import torch again.
PRELOAD_MODULES = ["stage1_assets.definitions", *STEP_MODULES]

EXECUTION_MODES = dg.Field(
    dg.Selector({
        "in_process": dg.in_process_executor.config_schema.as_field(),
        "multiprocess": dg.multiprocess_executor.config_schema.as_field(),
    }),
    default_value={"in_process": {}},
    description="in_process (default): every step in the run's process; multiprocess: one process per step.",
)


def multiprocess_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the forkserver start method (preloading this code location) unless one is given."""
    if config.get("start_method"):
        return dict(config)
    return {**config, "start_method": {"forkserver": {"preload_modules": list(PRELOAD_MODULES)}}}


def _requirements(config: Any) -> Any:
    mode, base = _mode(config)
    return base.get_requirements(config[mode])


def _mode(config: Any) -> tuple[str, Any]:
    mode = next(iter(config))
    return mode, {"in_process": dg.in_process_executor, "multiprocess": dg.multiprocess_executor}[mode]


@dg.executor(name="stage1_executor", config_schema=EXECUTION_MODES, requirements=_requirements)
def stage1_executor(init_context: Any) -> Any:
    """Reap dead runs, make pool waits sleep, then build the chosen executor."""
    from stage1_assets import pool_wait
    from stage1_assets.fast_exit import freeze_heap_at_exit
    from stage1_assets.recovery import reap_dead_runs

    reap_dead_runs(init_context.instance, log=lambda text: print(f"stage1 recovery: {text}", file=sys.stderr))
    pool_wait.install()  # a step waiting for the gpu pool sleeps instead of spinning a core
    freeze_heap_at_exit()  # the process that ran the run exits without collecting its heap
    mode, base = _mode(init_context.executor_config)
    config = dict(init_context.executor_config[mode])
    if mode == "multiprocess":
        config = multiprocess_config(config)
    return base.executor_creation_fn(init_context._replace(executor_def=base, executor_config=config))
