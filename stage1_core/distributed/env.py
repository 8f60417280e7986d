"""Who this process is in a ``torch.distributed`` job, and the few collectives the library uses.

Every function works without a process group: then there is one rank (0 of 1) and the
collectives return their input, so library code calls them unconditionally and the
single-process path stays exactly what it was. A job is started by ``torchrun``, which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init_from_env`
joins it (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch
import torch.distributed as dist

#: How long a collective waits for the other ranks before failing (a crashed rank never arrives).
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "STAGE1_DIST_TIMEOUT"


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes shared files."""
    return rank() == 0


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def timeout() -> _dt.timedelta:
    return _dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Join the ``torchrun`` job described by the environment; False (and nothing done) outside one."""
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=timeout())
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _reduce_device() -> torch.device:
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.cpu()]


def all_reduce_min(value: int) -> int:
    if not active():
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small control data only)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_reduce_device() if dist.get_backend() == "nccl" else None)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_slice(length: int, world: int | None = None, index: int | None = None) -> slice:
    """Rank ``index``'s contiguous part of ``length`` rows: sizes differ by at most one, lower ranks first."""
    world = world_size() if world is None else world
    index = rank() if index is None else index
    base, extra = divmod(length, world)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def environment() -> dict[str, Any]:
    """How this process computes (ranks, backend, threads per rank): recorded with artifacts, never in their ids."""
    return {"world_size": world_size(), "backend": dist.get_backend() if active() else None,
            "threads": torch.get_num_threads()}
