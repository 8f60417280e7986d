"""The Stage-1 classifier head on CLS features.

Phase 1 is the baseline MLP ``Linear(h, 768) - ReLU - Dropout(p) - Linear(768, 2)``, laid out as
a shared ``trunk`` and a ``cls`` layer so the phase-3 variant adds a ``gate`` (Linear(768, 1),
"this prediction is correct") and an ``aux`` classifier (Linear(768, 2)) on the same trunk
without changing a single existing key.

The features are standardised first, ``(x - input_mean) / input_std``, with fixed statistics of
the training features (:meth:`Stage1Head.set_input_standardization`; the trainer sets them when
``standardize_features`` is on). It is the probe's ``StandardScaler`` (and MAE's non-affine
normalisation before a linear probe): without it the head trained on the raw features of the
embedded default was a point below a logistic probe on val_select. The statistics are buffers, so
checkpoints and bundles carry them; identity (0, 1) is the default, and a state dict without them
(the baseline's, or one written before they existed) loads as identity. State-dict keys, stable
across releases:

    input_mean     [h]        input_std      [h]
    trunk.0.weight [768, h]   trunk.0.bias [768]
    cls.weight     [2, 768]   cls.bias     [2]
    gate.weight    [1, 768]   gate.bias    [1]      (with_gate=True only)
    aux.weight     [2, 768]   aux.bias     [2]      (with_gate=True only)

:func:`load_head_state_dict` also accepts the ``_orig_mod.`` prefix that ``torch.compile``
adds, the ``module.`` prefix of DataParallel, and the baseline script's ``nn.Sequential`` keys
(``0.*`` and ``3.*``), so an old ``classifier_head.pth`` loads unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

HEAD_WIDTH = 768
NUM_CLASSES = 2
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_BASELINE_KEYS = {"0.weight": "trunk.0.weight", "0.bias": "trunk.0.bias", "3.weight": "cls.weight", "3.bias": "cls.bias"}
#: Keys a state dict may lack (it then loads as identity standardisation).
STANDARDIZATION_KEYS = ("input_mean", "input_std")


class HeadOutput(NamedTuple):
    """Outputs of a head with a gate: class logits ``[B, 2]``, gate logit ``[B]``, aux logits ``[B, 2]``."""

    logits: torch.Tensor
    gate: torch.Tensor
    aux: torch.Tensor


class HeadStateError(ValueError):
    """A state dict does not fit the head; the message lists every offending key."""


class Stage1Head(nn.Module):
    """Baseline MLP head; ``with_gate=True`` adds the phase-3 gate and aux heads on the same trunk.

    ``forward`` returns the class logits ``[B, 2]`` without a gate and a :class:`HeadOutput`
    with one.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.3, with_gate: bool = False) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.hidden_size = int(hidden_size)
        self.dropout = float(dropout)
        self.with_gate = bool(with_gate)
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_std", torch.ones(hidden_size))
        self.trunk = nn.Sequential(nn.Linear(hidden_size, HEAD_WIDTH), nn.ReLU(), nn.Dropout(dropout))
        self.cls = nn.Linear(HEAD_WIDTH, NUM_CLASSES)
        if with_gate:
            self.gate = nn.Linear(HEAD_WIDTH, 1)
            self.aux = nn.Linear(HEAD_WIDTH, NUM_CLASSES)

    @torch.no_grad()
    def set_input_standardization(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardise inputs with the per-dimension mean and std of ``features`` [N, h] (N >= 2)."""
        if features.ndim != 2 or features.shape[1] != self.hidden_size or features.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, {self.hidden_size}], got shape {tuple(features.shape)}")
        data = features.double()
        self.input_mean.copy_(data.mean(0).to(self.input_mean))
        self.input_std.copy_(data.std(0).clamp_min(eps).to(self.input_std))

    def forward(self, features: torch.Tensor) -> torch.Tensor | HeadOutput:
        shared = self.trunk((features - self.input_mean) / self.input_std)
        logits = self.cls(shared)
        if not self.with_gate:
            return logits
        return HeadOutput(logits, self.gate(shared).squeeze(-1), self.aux(shared))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, dropout={self.dropout}, with_gate={self.with_gate}"


def head_logits(output: torch.Tensor | HeadOutput) -> torch.Tensor:
    """Class logits from either form of head output."""
    return output.logits if isinstance(output, HeadOutput) else output


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (all, or only those requiring gradients)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def unwrap(module: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (the module itself when not compiled)."""
    return getattr(module, "_orig_mod", module)


def maybe_compile(head: nn.Module, enabled: bool | None = None, **compile_kwargs: object) -> nn.Module:
    """``torch.compile(head)`` when ``enabled`` (``None``: on exactly when CUDA is available).

    The compiled wrapper shares parameters with ``head``; save ``unwrap(model).state_dict()`` to
    get keys without the ``_orig_mod.`` prefix.
    """
    if enabled is None:
        enabled = torch.cuda.is_available()
    if not enabled:
        return head
    return torch.compile(head, **compile_kwargs)  # type: ignore[return-value]


def normalise_head_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and map baseline ``nn.Sequential`` keys to the Stage1Head layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    stripped = True
        out[_BASELINE_KEYS.get(name, name)] = value
    return out


def load_head_state_dict(
    head: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path | None = None
) -> None:
    """Load ``state_dict`` into ``head`` (compiled or not) strictly.

    Only the standardisation buffers may be missing (both at once): they load as identity.
    Raises :class:`HeadStateError` naming every missing, unexpected and wrong-shaped key, and
    ``source`` (the file) when given.
    """
    if not isinstance(state_dict, Mapping):
        where = f"{source}: " if source else ""
        raise HeadStateError(f"{where}expected a state_dict (mapping of names to tensors), got {type(state_dict).__name__}")
    target = unwrap(head)
    incoming = normalise_head_keys(state_dict)
    expected = target.state_dict()
    if not any(key in incoming for key in STANDARDIZATION_KEYS) and all(key in expected for key in STANDARDIZATION_KEYS):
        incoming["input_mean"] = torch.zeros_like(expected["input_mean"])
        incoming["input_std"] = torch.ones_like(expected["input_std"])
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    mismatched = [
        f"{k}: file {tuple(incoming[k].shape)} vs head {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(incoming))
        if not isinstance(incoming[k], torch.Tensor) or tuple(incoming[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches [{'; '.join(mismatched)}]")
        where = f"{source}: " if source else ""
        raise HeadStateError(
            f"{where}state_dict does not fit {type(target).__name__}"
            f"(hidden_size={getattr(target, 'hidden_size', '?')}, with_gate={getattr(target, 'with_gate', '?')}): "
            + "; ".join(parts)
            + " - the file was written for another head or backbone (hidden size)"
        )
    target.load_state_dict(incoming, strict=True)
