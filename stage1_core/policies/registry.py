"""The exit-policy registry: name -> policy class; a policy module registers its class itself.

``@register_policy`` on an :class:`~stage1_core.policies.base.ExitPolicy` subclass makes it
available to every step, the evaluation, the bundle and the predictor by its ``name``; which
phases may deploy it is the phase table's ``exit_policies`` (``stage1_core/phases.py``).
"""

from __future__ import annotations

from pathlib import Path

from .base import ExitPolicy

__all__ = ["POLICIES", "register_policy", "policy_class", "load_policy"]

POLICIES: dict[str, type[ExitPolicy]] = {}


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
