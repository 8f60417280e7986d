"""Registry of the training losses a phase recipe can name (``PhaseRecipe.loss_kind``).

A builder takes the phase config and the training labels and returns ``loss_fn(output, labels)``
for :func:`stage1_core.training.trainer.train_head`, or ``None`` for the trainer's own
class-weighted cross-entropy (the baseline loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LossBuilder = Callable[[Any, torch.Tensor], Callable | None]
LOSSES: dict[str, LossBuilder] = {}


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    """Register a loss builder under ``name`` (decorator)."""

    def wrap(builder: LossBuilder) -> LossBuilder:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = builder
        return builder

    return wrap


def build_loss(name: str, config: Any, train_labels: torch.Tensor) -> Callable | None:
    """The loss ``name`` for ``config`` (None: the trainer's class-weighted CE)."""
    try:
        builder = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} in the phase recipe; known: {sorted(LOSSES)}") from None
    return builder(config, train_labels)


@register_loss("ce")
def _cross_entropy(config: Any, train_labels: torch.Tensor) -> None:
    """The baseline: class-weighted cross-entropy with label smoothing, built by the trainer."""
    return None


@register_loss("selective")
def _gated_head_loss(config: Any, train_labels: torch.Tensor) -> Callable:
    """Phase 3: CE on ``cls`` + soft-acceptance selective loss on the gate + CE on ``aux``.

    See :class:`stage1_core.training.losses.SelectiveLoss` for the exact form (coverage reward,
    squared penalty on the soft FNR of accepted positives above ``target_fnr_exit``, BCE of the
    gate against "the prediction is correct" weighted by ``gate_correct_weight``).
    """
    from stage1_core.training.losses import GateHeadLoss, SelectiveLoss, build_criterion

    cls = build_criterion(train_labels, float(config.label_smoothing), "cpu",
                          weighted=config.class_weighting == "balanced")
    selective = SelectiveLoss(target_fnr=float(config.target_fnr_exit), fnr_penalty=float(config.gate_fnr_penalty),
                              risk_weight=float(config.gate_risk_weight), aux_weight=float(config.aux_weight),
                              miss_temperature=float(config.gate_miss_temperature),
                              correct_weight=float(getattr(config, "gate_correct_weight", 0.0)))
    return GateHeadLoss(cls, selective, gate_loss_weight=float(config.gate_loss_weight),
                        aux_weight=float(config.aux_weight))


@register_loss("crt")
def _conformal_risk_training_loss(config: Any, train_labels: torch.Tensor) -> Callable:
    """Phase 6: CE on ``cls`` + ``aux_weight`` x CE on ``aux`` + ``crt_weight`` x conformal risk training.

    The conformal risk training term (:class:`stage1_core.training.risk_training.ConformalRiskTrainingLoss`)
    calibrates a smoothed FNR threshold on a pseudo-calibration part of each batch (``crt_fraction``)
    and rewards the smoothed coverage (temperature ``crt_temperature``) of the other part, on the
    gate score sigmoid(gate). The trainer slices batches of ``crt_batch_size`` for it; a batch size
    whose halves cannot hold enough positives is refused here.
    """
    from stage1_core.training.losses import build_criterion
    from stage1_core.training.risk_training import ConformalRiskHeadLoss, ConformalRiskTrainingLoss, check_crt_batch

    cls = build_criterion(train_labels, float(config.label_smoothing), "cpu",
                          weighted=config.class_weighting == "balanced")
    crt = ConformalRiskTrainingLoss(target_fnr=float(config.target_fnr_exit), temperature=float(config.crt_temperature),
                                    fraction=float(config.crt_fraction))
    batch = int(config.crt_batch_size)
    check_crt_batch(batch, float(torch.as_tensor(train_labels).float().mean()), crt)
    return ConformalRiskHeadLoss(cls, crt, crt_weight=float(config.crt_weight), aux_weight=float(config.aux_weight),
                                 batch_size=batch)
