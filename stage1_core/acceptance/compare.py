"""The one comparison rule the criteria share: a figure against a reference, with a margin.

``compare(current, reference, margin=...)`` answers "is ``current`` no worse than ``reference``
by more than ``margin``" (non-inferiority) or "is it better by more than ``margin``"
(superiority), for a figure where higher or lower is better, and keeps the figures a verdict
reports (difference, shortfall, margin, and a confidence interval of the difference when the
caller has one). A shortfall exactly at the margin passes non-inferiority and a gain exactly at
the margin fails superiority: :data:`SLACK` absorbs float rounding both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["SLACK", "Comparison", "compare"]

#: Float slack on the margin, so a shortfall equal to the margin (up to rounding) passes.
SLACK = 1e-12
Direction = Literal["non-inferiority", "superiority"]


@dataclass(frozen=True)
class Comparison:
    """``current`` vs ``reference`` under ``direction`` with ``margin`` (figure units)."""

    current: float
    reference: float
    margin: float
    direction: Direction = "non-inferiority"
    higher_is_better: bool = True
    #: Confidence interval of ``current - reference`` (paired bootstrap, ...), when known.
    ci: tuple[float, float] | None = None

    @property
    def difference(self) -> float:
        """``current - reference``."""
        return self.current - self.reference

    @property
    def shortfall(self) -> float:
        """How far ``current`` is behind ``reference`` in the better direction (negative: ahead)."""
        return self.reference - self.current if self.higher_is_better else self.current - self.reference

    @property
    def passed(self) -> bool:
        if self.direction == "non-inferiority":
            return self.shortfall <= self.margin + SLACK
        return -self.shortfall > self.margin + SLACK

    def figures(self, prefix: str = "") -> dict[str, Any]:
        """The comparison's figures for a verdict (keys prefixed with ``prefix``)."""
        out: dict[str, Any] = {"difference": self.difference, "shortfall": self.shortfall, "margin": self.margin,
                               "direction": self.direction}
        if self.ci is not None:
            out["ci_lower"], out["ci_upper"] = self.ci
        return {prefix + k: v for k, v in out.items()}


def compare(current: float, reference: float, *, margin: float, direction: Direction = "non-inferiority",
            higher_is_better: bool = True, ci: tuple[float, float] | None = None) -> Comparison:
    """A :class:`Comparison`; raises ValueError for an unknown direction or a negative margin."""
    if direction not in ("non-inferiority", "superiority"):
        raise ValueError(f"direction must be 'non-inferiority' or 'superiority', got {direction!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    return Comparison(float(current), float(reference), float(margin), direction, higher_is_better, ci)
