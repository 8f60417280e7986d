"""What training needs under DistributedDataParallel: one model to wrap, per-rank batches, per-rank RNG.

The convention that makes a ``world_size``-rank run equal a one-process run: the configured
batch size is the *global* batch. Every rank draws the same global batches - the ones a single
process would draw, from the same seeded generator (:class:`RankSlicedBatchSampler`) - and takes
its equal slice of each; DDP averages the gradients over the ranks, so with a loss that is a
mean over the batch (cross-entropy without class weights) a step sees the same gradient as one
process with the whole batch, up to the order of float additions. Gradient accumulation works as
in one process (DDP skips the all-reduce on the micro-batches of a group with ``no_sync``).
Losses that divide sums taken over the batch by a quantity of the batch (class-weighted CE,
the selective and conformal-risk losses) are per-rank ratios under DDP, not the global ratio;
the README's "Scaling out" section says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from stage1_core.distributed import env

#: Checkpoint key holding every rank's RNG states (a list in rank order) next to rank 0's ``rng_states``.
RANK_RNG_KEY = "rng_states_per_rank"


class JointModel(nn.Module):
    """``head(features_of(inputs))`` as one module, so DDP sees the head and the trainable backbone together."""

    def __init__(self, head: nn.Module, backbone: nn.Module | None, features_of: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.head = head
        self.backbone = backbone
        self._features_of = features_of

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.head(self._features_of(inputs))


def wrap(module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.parallel.DistributedDataParallel:
    """``module`` under DDP on this rank's device (rank 0's weights are broadcast to every rank).

    ``find_unused``: some parameters may get no gradient in a step (a gated head's gate under a
    plain classification loss); DDP then looks for them after every forward pass.
    """
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else None)
    return nn.parallel.DistributedDataParallel(module, device_ids=[index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused)


def check_global_batch(batch_size: int, what: str = "the batch size") -> int:
    """The per-rank batch of a global ``batch_size``; refuses one the ranks cannot share equally."""
    world = env.world_size()
    if batch_size % world:
        raise ValueError(f"{what} ({batch_size}) is the global batch and must be divisible by world_size={world} "
                         f"so every rank gets an equal share; choose a multiple of {world}")
    return batch_size // world


class RankSlicedBatchSampler(Sampler[list[int]]):
    """The global batches one process would draw (``RandomSampler`` + ``BatchSampler``), this rank's slice of each.

    ``generator`` is shared by the sampler and the DataLoader (its base seed), as in a one-process
    ``DataLoader(shuffle=True, generator=...)``, so with one rank the batches are the same.
    """

    def __init__(self, num_samples: int, global_batch: int, generator: torch.Generator | None, shuffle: bool = True,
                 drop_last: bool = True, world: int | None = None, index: int | None = None) -> None:
        base = RandomSampler(range(num_samples), generator=generator) if shuffle else SequentialSampler(range(num_samples))
        self.batches = BatchSampler(base, global_batch, drop_last)
        self.world = env.world_size() if world is None else world
        self.index = env.rank() if index is None else index

    def __len__(self) -> int:
        batches = len(self.batches)
        short = not self.batches.drop_last and 0 < len(self.batches.sampler) % self.batches.batch_size < self.world
        return batches - 1 if short else batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) < self.world:  # a last batch too small to give every rank a row is skipped
                return
            yield batch[env.rank_slice(len(batch), self.world, self.index)]


def train_loader(dataset: Dataset, global_batch: int, num_workers: int | None, device: torch.device | str,
                 seed: int) -> DataLoader:
    """This rank's training DataLoader: :func:`stage1_core.data.loaders.make_dataloader` sliced per rank."""
    from stage1_core.data.loaders import resolve_num_workers, seed_worker

    check_global_batch(global_batch)
    size = len(dataset)  # type: ignore[arg-type]
    if size < global_batch:
        raise ValueError(f"training set has {size} samples, fewer than the global batch {global_batch}; lower the "
                         f"batch size or add data")
    workers = resolve_num_workers(num_workers)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_sampler=RankSlicedBatchSampler(size, global_batch, generator),
        num_workers=workers, pin_memory=torch.device(device).type == "cuda" and torch.cuda.is_available(),
        persistent_workers=workers > 0, worker_init_fn=seed_worker if workers > 0 else None, generator=generator,
    )


def seed_rank(seed: int) -> None:
    """Give each rank its own stream for dropout and augmentation (rank 0 keeps ``seed``'s stream)."""
    if env.active() and env.rank() > 0:
        torch.manual_seed(seed + 1_000_003 * env.rank())


def gather_rng_states(generators: dict[str, torch.Generator]) -> list[dict[str, Any]]:
    """Every rank's RNG states (global RNGs and ``generators``), in rank order, on every rank."""
    from stage1_core.training.seeding import capture_rng_states

    return env.gather_objects(capture_rng_states(generators))


def rng_states_for_this_rank(checkpoint: dict[str, Any], source: Any) -> dict[str, Any]:
    """The RNG states this rank saved; refuses a checkpoint written by another number of ranks."""
    per_rank = checkpoint.get(RANK_RNG_KEY)
    saved_world = len(per_rank) if per_rank else 1
    if saved_world != env.world_size():
        raise ValueError(f"{source}: written by {saved_world} rank(s), resumed with world_size={env.world_size()}; "
                         f"an exact resume needs the same number of ranks")
    return per_rank[env.rank()] if per_rank else checkpoint["rng_states"]


@torch.no_grad()
def broadcast_trainable(*modules: nn.Module | None) -> None:
    """Rank 0's trainable parameters and buffers on every rank, before the optimiser and the EMA copy them.

    Frozen weights come from the same file on every rank; adapters and heads are initialised from
    each process's RNG, which need not agree across ranks.
    """
    if not env.active():
        return
    import torch.distributed as dist

    for module in modules:
        if module is None:
            continue
        for tensor in [p for p in module.parameters() if p.requires_grad] + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
