"""The criterion registry: each family module declares its criteria and registers their readers.

A criterion is declared once (:func:`declare`: name, the asset it judges, what it demands), next
to its reader (:func:`reader`) and its pure rule. Phase rows name criteria by key
(``stage1_core/phases.py``); the Dagster checks, the pipeline and the summary read this registry,
so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stage1_core.gates import GateVerdict
    from stage1_core.steps.context import StepContext

__all__ = ["Criterion", "CRITERIA", "READERS", "declare", "reader"]


@dataclass(frozen=True)
class Criterion:
    """One acceptance criterion of a phase gate (one blocking asset check each)."""

    name: str
    asset: str
    description: str


Reader = Callable[["StepContext"], "GateVerdict"]
#: Every declared criterion, in declaration order (the order checks and summaries list them).
CRITERIA: dict[str, Criterion] = {}
#: The function that gathers a criterion's inputs from the artifacts and applies its rule.
READERS: dict[str, Reader] = {}


def declare(name: str, asset: str, description: str) -> Criterion:
    """Declare criterion ``name``, judged on ``asset``; refuses a name declared twice."""
    if name in CRITERIA:
        raise ValueError(f"criterion {name!r} is declared twice")
    CRITERIA[name] = Criterion(name, asset, description)
    return CRITERIA[name]


def reader(name: str) -> Callable[[Reader], Reader]:
    """Register the reader deciding criterion ``name`` (declared first with :func:`declare`)."""

    def wrap(fn: Reader) -> Reader:
        if name not in CRITERIA:
            raise ValueError(f"criterion {name!r} has a reader but no declaration")
        if name in READERS:
            raise ValueError(f"criterion {name!r} is registered twice ({READERS[name].__name__} and {fn.__name__})")
        READERS[name] = fn
        return fn

    return wrap
