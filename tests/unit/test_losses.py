"""Class weights and the class-weighted, label-smoothed cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1_core.training.losses import build_criterion, class_weights


def test_class_weights_are_the_baseline_formula():
    labels = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    counts = np.bincount(labels.numpy())
    expected = len(labels) / (len(counts) * counts + 1e-6)  # the baseline's expression
    weights = class_weights(labels)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))
    assert weights[0].item() == pytest.approx(10 / 4, rel=1e-6) and weights[1].item() == pytest.approx(10 / 16, rel=1e-6)


def test_a_missing_class_is_an_error():
    with pytest.raises(ValueError, match=r"no sample of class\(es\) \[0\]"):
        class_weights(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        class_weights(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        class_weights(torch.tensor([], dtype=torch.long))


def test_criterion_matches_manual_weighted_smoothed_cross_entropy():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 1, 1, 0, 1])
    logits = torch.randn(6, 2)
    criterion = build_criterion(labels, label_smoothing=0.1)
    w = class_weights(labels)
    eps, k = 0.1, 2
    logp = torch.log_softmax(logits, dim=1)
    target = torch.full((6, 2), eps / k)
    target[torch.arange(6), labels] += 1 - eps
    per_sample = -(target * logp * w).sum(dim=1)
    manual = per_sample.sum() / w[labels].sum()
    assert criterion(logits, labels).item() == pytest.approx(manual.item(), rel=1e-6)
    assert criterion.label_smoothing == 0.1
    assert build_criterion(labels, 0.0, weighted=False).weight is None
