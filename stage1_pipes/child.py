"""Entry point of every rank of a distributed step: ``torchrun ... -m stage1_pipes.child --asset ...``.

Each rank joins the process group (gloo on CPU, NCCL on GPUs) and runs
:func:`stage1_core.distributed.steps.run_distributed_step`. Only rank 0 opens the Dagster Pipes
context: its log lines go to the Dagster run, and when the step is done it reports the step's
result (metadata, tables, figure paths, lineage id) as one custom message, from which the
launching asset builds its materialisation exactly as an in-process step's, plus the
materialisation itself with the lineage id as data version. Outside a Pipes launch (plain
``torchrun`` from a shell) the same code runs and prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

#: Threads per rank, set by the launcher (the machine's threads split between the ranks).
THREADS_ENV = "STAGE1_THREADS_PER_RANK"
PATH_KEY = "__path__"


def encode(value: Any) -> Any:
    """JSON-ready copy of a step's metadata: paths tagged so the launcher can show them as paths."""
    import numpy as np

    if isinstance(value, Path):
        return {PATH_KEY: str(value)}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def result_message(result: Any) -> dict[str, Any]:
    """The custom message rank 0 sends: everything ``stage1_assets`` needs to rebuild the materialisation."""
    from stage1_core.distributed import env

    return {
        "kind": "stage1-step-result",
        "path": str(result.path),
        "metadata": encode(result.metadata),
        "tables": encode(result.tables),
        "figures": {title: str(path) for title, path in result.figures.items()},
        "data_version": result.data_version,
        "environment": env.environment(),
    }


class _PipesHandler(logging.Handler):
    """Library log records (INFO and up) to the Dagster run through Pipes."""

    def __init__(self, pipes_log: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self.pipes_log = pipes_log

    def emit(self, record: logging.LogRecord) -> None:
        self.pipes_log.log(record.levelno, self.format(record))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stage1_pipes.child", description=__doc__.splitlines()[0])
    parser.add_argument("--asset", required=True, help="backbone, cached_features or checkpoint")
    parser.add_argument("--partition", required=True, help="the phase, e.g. phase4")
    parser.add_argument("--root", required=True, help="the artifacts root (the Dagster resource's layout root)")
    parser.add_argument("--config", required=True, help="the run's config.json, as the launching asset saved it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from stage1_core.config import Stage1ProConfig
    from stage1_core.distributed import env
    from stage1_core.distributed.steps import run_distributed_step
    from stage1_core.steps.context import Layout

    args = _parse(argv)
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    env.init_from_env()
    try:
        config, layout = Stage1ProConfig.load(args.config), Layout(args.root)
        if not env.is_main():
            run_distributed_step(args.asset, config, layout, args.partition)
            return 0
        if not os.environ.get("DAGSTER_PIPES_CONTEXT"):
            result = run_distributed_step(args.asset, config, layout, args.partition)
            print(json.dumps(result_message(result), indent=1))
            return 0
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            handler = _PipesHandler(pipes.log)
            logging.getLogger("stage1_core").addHandler(handler)
            logging.getLogger("stage1_core").setLevel(logging.INFO)
            pipes.log.info(f"{args.asset}[{args.partition}] on {env.world_size()} rank(s), "
                           f"{torch.get_num_threads()} thread(s) each")
            result = run_distributed_step(args.asset, config, layout, args.partition)
            message = result_message(result)
            pipes.report_custom_message(message)
            pipes.report_asset_materialization(
                metadata={"world_size": env.world_size(), "threads_per_rank": torch.get_num_threads()},
                data_version=result.data_version,
            )
        return 0
    finally:
        env.shutdown()


if __name__ == "__main__":
    sys.exit(main())
