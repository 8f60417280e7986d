"""Plain-text formatting of figures for READMEs and summaries (one rule for None, bools, floats)."""

from __future__ import annotations

from typing import Any

__all__ = ["fmt", "fmt_threshold", "pct"]

#: Significant digits of a threshold read from a policy file (enough to reproduce its decisions).
THRESHOLD_DIGITS = 6


def fmt(value: Any, digits: int = 4) -> str:
    """``n/a`` for None, ``yes``/``no`` for bools, ``digits`` significant digits for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_threshold(value: Any) -> str:
    """A certified threshold with :data:`THRESHOLD_DIGITS` significant digits."""
    return fmt(value, THRESHOLD_DIGITS)


def pct(value: Any) -> str:
    """A fraction as a percentage with two decimals (``n/a`` for None)."""
    return "n/a" if value is None else f"{100.0 * float(value):.2f}%"
