"""Steps on several processes: ``torchrun`` launched through Dagster Pipes (``PipesSubprocessClient``).

When the config's ``world_size`` is above 1, the assets whose work grows with the data
(:data:`stage1_core.distributed.steps.DISTRIBUTED_ASSETS`) do not run their step in the run's
process: :func:`run_with_torchrun` starts ``python -m torch.distributed.run --nproc-per-node
world_size -m stage1_pipes.child ...`` as a Pipes subprocess, with this process's CPU threads
split between the ranks. Rank 0 of the job opens the Pipes context: its logs reach the run, and
the step's result (metadata, tables, figures, lineage id) comes back as a custom message, from
which :func:`~stage1_assets.assets._common.step_result` builds the materialisation as for an
in-process step; the data version is the one rank 0 reports. The asset step keeps holding the
partition's write lock and its inputs' read locks while the job runs.

On Kubernetes the same call goes through ``PipesK8sClient`` (README, "Scaling out").
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

CHILD_MODULE = "stage1_pipes.child"


@dataclass
class RemoteStepResult:
    """A step's result as rank 0 reported it (what ``step_result`` reads from a ``StepResult``)."""

    path: Path
    metadata: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    data_version: str | None = None


def _decode(value: Any) -> Any:
    from stage1_pipes.child import PATH_KEY

    if isinstance(value, dict):
        if set(value) == {PATH_KEY}:
            return Path(value[PATH_KEY])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def decode_result(message: dict[str, Any]) -> RemoteStepResult:
    return RemoteStepResult(
        path=Path(message["path"]), metadata=_decode(message["metadata"]), tables=_decode(message["tables"]),
        figures={title: Path(p) for title, p in message["figures"].items()}, data_version=message["data_version"],
    )


def threads_per_rank(world_size: int) -> int:
    """This process's torch threads split evenly between the ranks (at least one each)."""
    import torch

    return max(1, torch.get_num_threads() // world_size)


def torchrun_command(asset: str, partition: str, root: Path, config_path: Path, world_size: int) -> list[str]:
    """The ``torchrun`` command line of one distributed step on this machine (``--standalone`` rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={world_size}", "-m", CHILD_MODULE, "--asset", asset, "--partition", partition,
            "--root", str(root), "--config", str(config_path)]


def run_with_torchrun(context: Any, config: Any, layout: Any, asset: str, partition: str,
                      client: dg.PipesSubprocessClient | None = None) -> tuple[RemoteStepResult, dg.MaterializeResult]:
    """Run ``asset[partition]`` on ``config.world_size`` ranks; ``(rank 0's result, the Pipes materialisation)``."""
    world_size = int(config.world_size)
    threads = threads_per_rank(world_size)
    client = client or dg.PipesSubprocessClient()
    with tempfile.TemporaryDirectory(prefix="stage1-pipes-") as tmp:
        config_path = config.save(Path(tmp) / "config.json")
        command = torchrun_command(asset, partition, layout.root, config_path, world_size)
        context.log.info(f"{asset}[{partition}]: torchrun with {world_size} ranks x {threads} thread(s): "
                         f"{' '.join(command)}")
        invocation = client.run(context=context, command=command,
                                env={"STAGE1_THREADS_PER_RANK": str(threads), "OMP_NUM_THREADS": str(threads)})
    messages = [m for m in invocation.get_custom_messages()
                if isinstance(m, dict) and m.get("kind") == "stage1-step-result"]
    if len(messages) != 1:
        raise dg.Failure(description=f"{asset}[{partition}]: the torchrun job ended without reporting its result "
                                     f"({len(messages)} result messages); see its logs above")
    return decode_result(messages[0]), invocation.get_materialize_result()
