"""Exponential moving average of the trainable parameters (the baseline's EMA, plus a warm-up).

Same interface and semantics as the baseline: ``register`` copies every trainable parameter,
``update`` sets ``shadow = (1 - d) * param + d * shadow``, ``apply_shadow`` swaps the averages
into the model (keeping a backup) and ``restore`` puts the live weights back.

The baseline evaluates EMA weights with ``d = 0.9999``: after ~1000 optimiser steps those are
still ~90% the initial random weights (``0.9999 ** 1000 = 0.905``), which shows as near-chance
validation accuracy. With ``warmup=True`` (the default) the decay of update ``t`` (0-based) is
``min(decay, (1 + t) / (10 + t))`` - the timm/TF warm-up - so early averages follow the
weights and the configured decay is reached only once the run is long enough for it.
``warmup=False`` is the baseline exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)


def ema_horizon(decay: float) -> float:
    """Number of updates an EMA with ``decay`` averages over, ``1 / (1 - decay)``."""
    return math.inf if decay >= 1.0 else 1.0 / (1.0 - decay)


def initial_weight_share(decay: float, total_steps: int, warmup: bool) -> float:
    """Weight the shadow puts on the initial parameters after ``total_steps`` updates."""
    share = 1.0
    for t in range(total_steps):
        share *= min(decay, (1.0 + t) / (10.0 + t)) if warmup else decay
        if share < 1e-12:
            return 0.0
    return share


def check_ema_horizon(decay: float, total_steps: int, warmup: bool) -> str | None:
    """Warn when the EMA horizon ``1 / (1 - decay)`` exceeds the run's optimiser steps.

    Returns the message (``None`` when the horizon fits). With ``warmup`` the decay actually
    used is smaller, so the message is logged at INFO level and says how much of the initial
    weights remains; without it a ``UserWarning`` is raised.
    """
    horizon = ema_horizon(decay)
    if horizon <= total_steps:
        return None
    share = initial_weight_share(decay, total_steps, warmup)
    message = (
        f"EMA horizon 1/(1-ema_decay) = {horizon:.0f} optimiser steps exceeds the {total_steps} steps of this run; "
        f"the final EMA weights keep {100 * share:.1f}% of the initial (random) head weights"
    )
    if warmup:
        logger.info("%s (EMA warm-up is on, so the average still follows training)", message)
    else:
        warnings.warn(
            message + " - lower ema_decay, train longer or turn ema_warmup on", UserWarning, stacklevel=2
        )
    return message


class EMA:
    """EMA of ``model``'s trainable parameters, keyed by parameter name."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1)")
        self.model = model
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.register()

    def _trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def register(self) -> None:
        """Copy every trainable parameter into the shadow."""
        for name, param in self._trainable():
            self.shadow[name] = param.data.clone()

    def current_decay(self) -> float:
        """Decay the next :meth:`update` uses."""
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """``shadow = (1 - d) * param + d * shadow``.

        Same roundings as the baseline's expression (two products, then their sum), done with
        three ``torch._foreach_*`` calls over all tensors instead of a Python loop.
        """
        d = self.current_decay()
        names, params = zip(*((n, p.data) for n, p in self._trainable())) if self.shadow else ((), ())
        if names:
            shadows = [self.shadow[n] for n in names]
            scaled = torch._foreach_mul(list(params), 1.0 - d)
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, scaled)
        self.num_updates += 1

    @torch.no_grad()
    def apply_shadow(self) -> None:
        """Put the averages into the model, keeping the live weights in ``backup``."""
        for name, param in self._trainable():
            self.backup[name] = param.data.clone()
            param.data.copy_(self.shadow[name])

    @torch.no_grad()
    def restore(self) -> None:
        """Put the live weights saved by :meth:`apply_shadow` back."""
        for name, param in self._trainable():
            param.data.copy_(self.backup[name])
        self.backup = {}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Context in which the model holds the EMA weights."""
        self.apply_shadow()
        try:
            yield
        finally:
            self.restore()

    def load_shadow(self, shadow: Mapping[str, torch.Tensor], num_updates: int = 0) -> None:
        """Restore a shadow saved from :attr:`shadow` (checkpoint key ``ema_state_dict``)."""
        expected = {n: p for n, p in self._trainable()}
        missing = sorted(set(expected) - set(shadow))
        unexpected = sorted(set(shadow) - set(expected))
        mismatched = [
            f"{n}: {tuple(shadow[n].shape)} vs {tuple(expected[n].shape)}"
            for n in sorted(set(expected) & set(shadow))
            if tuple(shadow[n].shape) != tuple(expected[n].shape)
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"EMA shadow does not fit the model: missing {missing}, unexpected {unexpected}, "
                f"shape mismatches {mismatched}"
            )
        for name, param in expected.items():
            self.shadow[name] = shadow[name].detach().to(param.device, param.dtype).clone()
        self.num_updates = int(num_updates)
