"""Class-weighted cross-entropy with label smoothing (the baseline's loss)."""

from __future__ import annotations

import torch
from torch import nn

CLASS_WEIGHT_EPS = 1e-6


def class_weights(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights ``total / (k * count + 1e-6)`` (float32, one per class).

    Raises ``ValueError`` when a class has no sample: its weight would be ``total / 1e-6`` and
    the loss would be dominated by a class that cannot be learnt.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() == 0:
        raise ValueError("cannot compute class weights from an empty label set")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found {sorted(set(labels.tolist()))[:10]}")
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    absent = [c for c in range(num_classes) if counts[c] == 0]
    if absent:
        raise ValueError(
            f"the training labels contain no sample of class(es) {absent} (counts {counts.long().tolist()}); "
            f"a binary head needs both 0 (no roadwork) and 1 (roadwork) in the training split"
        )
    total = float(labels.numel())
    return (total / (num_classes * counts + CLASS_WEIGHT_EPS)).to(torch.float32)


def build_criterion(
    labels: torch.Tensor,
    label_smoothing: float,
    device: str | torch.device = "cpu",
    num_classes: int = 2,
    weighted: bool = True,
) -> nn.CrossEntropyLoss:
    """``CrossEntropyLoss(weight=class_weights(labels), label_smoothing=...)`` on ``device``."""
    weight = class_weights(labels, num_classes).to(device) if weighted else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
