"""A cached training split with several views per image (clean + challenge views)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stage1_core.features import TensorSplit


@dataclass(frozen=True)
class MultiViewSplit(TensorSplit):
    """``features`` are the clean view; ``views`` ``[V, N, hidden]`` stacks the clean view and the others.

    The cached trainer draws one of the V views per image each epoch, so the head learns on the
    distribution it is certified on without V times the steps.
    """

    views: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.views is None or self.views.ndim != 3 or tuple(self.views.shape[1:]) != tuple(self.features.shape):
            shape = None if self.views is None else tuple(self.views.shape)
            raise ValueError(f"views must be [V, {self.features.shape[0]}, {self.features.shape[1]}], got {shape}")

    @classmethod
    def of(cls, clean: TensorSplit, others: Sequence[torch.Tensor]) -> "MultiViewSplit":
        views = torch.stack([clean.features, *[o.to(clean.features.dtype) for o in others]])
        return cls(clean.features, clean.labels, clean.sample_ids, clean.name, views)

    @property
    def num_views(self) -> int:
        return int(self.views.shape[0])
