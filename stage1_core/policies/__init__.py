"""Exit policies: the :class:`ExitPolicy` interface, its implementations and their registry.

A new policy (gate, scrc) subclasses :class:`ExitPolicy` and is added to :data:`POLICIES`;
evaluation and inference look policies up here by name and never change.
"""

from __future__ import annotations

from pathlib import Path

from .base import DEFERRED_SET, Decisions, ExitPolicy
from .gate import GateExitPolicy, fit_gate_policy, gateparams_document
from .scrc import SCRCExitPolicy
from .softmax import SoftmaxExitPolicy

__all__ = [
    "DEFERRED_SET",
    "Decisions",
    "ExitPolicy",
    "SoftmaxExitPolicy",
    "GateExitPolicy",
    "SCRCExitPolicy",
    "fit_gate_policy",
    "gateparams_document",
    "POLICIES",
    "register_policy",
    "policy_class",
    "load_policy",
]

POLICIES: dict[str, type[ExitPolicy]] = {
    "softmax": SoftmaxExitPolicy,
    "gate": GateExitPolicy,
    "scrc": SCRCExitPolicy,
}


def register_policy(cls: type[ExitPolicy]) -> type[ExitPolicy]:
    """Add ``cls`` to :data:`POLICIES` under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, ExitPolicy)):
        raise TypeError(f"{cls!r} is not an ExitPolicy subclass")
    existing = POLICIES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"policy name {cls.name!r} is already taken by {existing.__name__}")
    POLICIES[cls.name] = cls
    return cls


def policy_class(name: str) -> type[ExitPolicy]:
    """The policy class registered as ``name``."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown exit policy {name!r}; known: {sorted(POLICIES)}") from None


def load_policy(name: str, path: str | Path) -> ExitPolicy:
    """Load policy ``name`` from its file at ``path`` (validated against the policy's schema)."""
    return policy_class(name).from_file(path)
