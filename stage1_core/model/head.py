"""The Stage-1 classifier head on CLS features.

Phase 1 is the baseline MLP ``Linear(h, 768) - ReLU - Dropout(p) - Linear(768, 2)``, laid out as
a shared ``trunk`` and a ``cls`` layer so the phase-3 variant adds a ``gate`` (Linear(768, 1),
"this prediction is correct") and an ``aux`` classifier (Linear(768, 2)) on the same trunk
without changing a single existing key.

The gate also reads the class head's own margin d = z1 - z0, *detached*, through two weights
``gate_margin.weight`` [2] on (d, |d|) (a deviation from METHODS section 4's plain Linear(768, 1)):

    gate = gate.weight @ trunk(x) + gate.bias + w[0] * d + w[1] * |d|,    w = gate_margin.weight

A gate linear in the trunk's features can express d (the cls layer is linear too) but not the
confidence |d|, so it could not even reproduce the max-softmax ranking; with ``|d|`` it can, and
with ``d`` it can tilt it towards one class. ``w`` starts at zero (the gate is then
exactly the plain linear gate) and trains only with ``gate_margin_input=True``; a head built
without it keeps it frozen at zero, and a state dict without it (written before it existed)
loads it as zero. The margin is detached so the gate's losses never move the class head.

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
    gate_margin.weight [2]                          (with_gate=True only; may be missing: zeros)

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
#: Gate key a state dict may lack (a gated head written before it existed): it loads as zeros.
GATE_MARGIN_KEY = "gate_margin.weight"


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
    with one. ``gate_margin_input`` (gated heads only) lets the gate learn its weights on the
    detached class margin (see the module docstring); off, they stay frozen (at zero when new).
    """

    def __init__(
        self, hidden_size: int, dropout: float = 0.3, with_gate: bool = False, gate_margin_input: bool = False
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.hidden_size = int(hidden_size)
        self.dropout = float(dropout)
        self.with_gate = bool(with_gate)
        if gate_margin_input and not with_gate:
            raise ValueError("gate_margin_input needs the gated head (with_gate=True)")
        self.gate_margin_input = bool(gate_margin_input)
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_std", torch.ones(hidden_size))
        self.trunk = nn.Sequential(nn.Linear(hidden_size, HEAD_WIDTH), nn.ReLU(), nn.Dropout(dropout))
        self.cls = nn.Linear(HEAD_WIDTH, NUM_CLASSES)
        if with_gate:
            self.gate = nn.Linear(HEAD_WIDTH, 1)
            self.aux = nn.Linear(HEAD_WIDTH, NUM_CLASSES)
            self.gate_margin = GateMargin(trainable=self.gate_margin_input)

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
        gate = self.gate(shared).squeeze(-1) + self.gate_margin(logits)
        return HeadOutput(logits, gate, self.aux(shared))

    def extra_repr(self) -> str:
        extra = f", gate_margin_input={self.gate_margin_input}" if self.with_gate else ""
        return f"hidden_size={self.hidden_size}, dropout={self.dropout}, with_gate={self.with_gate}{extra}"


class GateMargin(nn.Module):
    """The gate's term on the detached class margin: ``w[0] * d + w[1] * |d|`` per sample ([B]).

    ``weight`` [2] starts at zero without drawing random numbers (a head without the margin input
    keeps its RNG stream) and is frozen unless ``trainable``.
    """

    def __init__(self, trainable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2), requires_grad=bool(trainable))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return margin_features(logits) @ self.weight.to(logits.dtype)


def margin_features(logits: torch.Tensor) -> torch.Tensor:
    """``[d, |d|]`` per sample (``[B, 2]``) with d = z1 - z0 of the class logits, detached."""
    margin = (logits[:, 1] - logits[:, 0]).detach()
    return torch.stack([margin, margin.abs()], dim=1)


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

    Only the standardisation buffers may be missing (both at once): they load as identity; and
    a gated state dict may lack ``gate_margin.weight``: it loads as zeros (the plain linear gate).
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
    if GATE_MARGIN_KEY in expected and GATE_MARGIN_KEY not in incoming:
        incoming[GATE_MARGIN_KEY] = torch.zeros_like(expected[GATE_MARGIN_KEY])
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
