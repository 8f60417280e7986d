"""A cached split with several views per image, and the trainer's per-epoch choice among them."""

from __future__ import annotations

import pytest
import torch

from stage1_core.data.views import MultiViewSplit
from stage1_core.features import TensorSplit


def test_multiview_split_stacks_clean_first():
    clean = TensorSplit(torch.zeros(5, 3), torch.tensor([0, 1, 0, 1, 1]), tuple("abcde"), "train")
    split = MultiViewSplit.of(clean, [torch.ones(5, 3), 2 * torch.ones(5, 3)])
    assert split.num_views == 3 and torch.equal(split.views[0], clean.features)
    with pytest.raises(ValueError, match="views must be"):
        MultiViewSplit(clean.features, clean.labels, None, "train", torch.zeros(2, 4, 3))


def test_cached_batches_draw_one_view_per_image_and_epoch():
    from stage1_core.training.trainer import _CachedBatches

    n = 400
    clean = TensorSplit(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long), None, "train")
    split = MultiViewSplit.of(clean, [torch.ones(n, 2)])
    gen = torch.Generator().manual_seed(0)
    batches = _CachedBatches(split, 100, torch.device("cpu"), gen)
    first = torch.cat([x for x, _ in batches])[:, 0]
    second = torch.cat([x for x, _ in batches])[:, 0]
    assert 0.4 < first.mean() < 0.6  # about half the images show their challenge view
    assert not torch.equal(first, second)  # a new draw each epoch
    assert set(first.tolist()) == {0.0, 1.0}
