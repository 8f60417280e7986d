"""The one comparison rule the criteria share: a figure against a reference, with a margin.

``compare(current, reference, margin=...)`` answers "is ``current`` no worse than ``reference``
by more than ``margin``" (non-inferiority) or "is it better by more than ``margin``"
(superiority), for a figure where higher or lower is better, and keeps the figures a verdict
reports (difference, shortfall, margin, and a confidence interval of the difference when the
caller has one). A shortfall exactly at the margin passes non-inferiority and a gain exactly at
the margin fails superiority: :data:`SLACK` absorbs float rounding both ways.

With a confidence interval the burden of proof is on the claim: non-inferiority passes only when
the CI's worst end (the lower end of the gain) is above ``-margin``, superiority only when it is
above ``margin``; a point estimate on the right side with a CI across the line fails.
:func:`paired_compare` builds that CI from per-image figures of two fixed models on the same
images (a paired bootstrap), and :func:`noninferiority_power` says how often two models of equal
quality pass a non-inferiority margin with ``n`` images of which a share ``d`` disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["SLACK", "Comparison", "compare", "images_for_power", "noninferiority_power", "paired_compare"]

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
    #: How ``ci`` was obtained, as a verdict's message names it.
    ci_kind: str = "paired bootstrap"

    @property
    def difference(self) -> float:
        """``current - reference``."""
        return self.current - self.reference

    @property
    def shortfall(self) -> float:
        """How far ``current`` is behind ``reference`` in the better direction (negative: ahead)."""
        return self.reference - self.current if self.higher_is_better else self.current - self.reference

    @property
    def worst_gain(self) -> float:
        """The gain (``-shortfall``) at the CI's unfavourable end; the point gain without a CI."""
        if self.ci is None:
            return -self.shortfall
        return self.ci[0] if self.higher_is_better else -self.ci[1]

    @property
    def passed(self) -> bool:
        if self.direction == "non-inferiority":
            return self.worst_gain >= -self.margin - SLACK
        return self.worst_gain > self.margin + SLACK

    def figures(self, prefix: str = "") -> dict[str, Any]:
        """The comparison's figures for a verdict (keys prefixed with ``prefix``)."""
        out: dict[str, Any] = {"difference": self.difference, "shortfall": self.shortfall, "margin": self.margin,
                               "direction": self.direction}
        if self.ci is not None:
            out["ci_lower"], out["ci_upper"] = self.ci
            out["worst_gain"] = self.worst_gain
        return {prefix + k: v for k, v in out.items()}

    def describe(self, what: str, unit: float = 100.0, suffix: str = " points") -> str:
        """One line: the figures, the CI and the rule it was judged by, e.g. for a verdict's message."""
        ci = (f", {self.confidence_text}CI [{self.ci[0] * unit:+.2f}, {self.ci[1] * unit:+.2f}]"
              if self.ci is not None else "")
        need = (f"worst gain > {self.margin * unit:+.2f}" if self.direction == "superiority"
                else f"worst gain >= {-self.margin * unit:+.2f}")
        verdict = "passes" if self.passed else "FAILS"
        return (f"{what} {self.current * unit:.2f} vs {self.reference * unit:.2f}: difference "
                f"{self.difference * unit:+.2f}{suffix}{ci}; {self.direction} needs {need}{suffix}: {verdict}")

    @property
    def confidence_text(self) -> str:
        return f"{self.ci_kind} "


def compare(current: float, reference: float, *, margin: float, direction: Direction = "non-inferiority",
            higher_is_better: bool = True, ci: tuple[float, float] | None = None,
            ci_kind: str = "paired bootstrap") -> Comparison:
    """A :class:`Comparison`; raises ValueError for an unknown direction or a negative margin."""
    if direction not in ("non-inferiority", "superiority"):
        raise ValueError(f"direction must be 'non-inferiority' or 'superiority', got {direction!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    return Comparison(float(current), float(reference), float(margin), direction, higher_is_better, ci, ci_kind)


def paired_compare(current: np.ndarray, reference: np.ndarray, *, margin: float, direction: Direction,
                   n_resamples: int, confidence: float, seed: int) -> tuple[Comparison, dict[str, Any]]:
    """Compare the means of two per-image figures of fixed models on the same images (higher is better).

    ``current`` and ``reference`` are [N] arrays (e.g. 0/1 "correct" or "exits"), row i the same
    image. The CI of ``mean(current) - mean(reference)`` is a paired percentile bootstrap. Returns
    the :class:`Comparison` and the evidence a verdict reports: ``n``, the share of images on which
    the two differ (``disagreement``) and the power of this margin at that share
    (:func:`noninferiority_power`).
    """
    from stage1_core.metrics.paired import paired_bootstrap_difference

    a = np.asarray(current, dtype=float).reshape(-1)
    b = np.asarray(reference, dtype=float).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired figures need two arrays of the same non-zero length, got {a.shape} and {b.shape}")
    ci = paired_bootstrap_difference(a, b, n_resamples, confidence, seed)
    comparison = compare(a.mean(), b.mean(), margin=margin, direction=direction, ci=(ci["ci_lower"], ci["ci_upper"]))
    disagreement = float(np.mean(a != b))
    evidence = {"n": int(a.size), "disagreement": disagreement, "confidence": float(confidence),
                "n_resamples": int(n_resamples),
                "power_at_margin": noninferiority_power(margin, int(a.size), disagreement, confidence)}
    return comparison, evidence


def noninferiority_power(margin: float, n: int, disagreement: float, confidence: float = 0.95,
                         spread_sd: float = 0.0) -> float:
    """P(pass) of the non-inferiority rule for two models of equal quality (normal approximation).

    The per-image difference of two 0/1 figures is -1, 0 or +1; with equal means its variance is
    the disagreement share ``d``, so the mean difference has standard error ``s = sqrt(d / n)``
    and the rule "CI lower end >= -margin" passes with probability ``Phi(margin / s - z)``, ``z``
    the two-sided CI's quantile. ``d = 0`` (identical decisions) passes surely.

    ``spread_sd`` adds what the paired test cannot see: equal models whose figures still differ
    by a random amount before any val_test image is drawn, e.g. two policies each certified at
    maximum coverage on val_calib, whose thresholds land apart by chance
    (``benchmarks/certification_spread.py --pairs``). With that difference ~ N(0, spread_sd^2)
    the rule passes with probability ``Phi((margin - z s) / sqrt(spread_sd^2 + s^2))``.
    """
    from scipy.stats import norm

    if spread_sd < 0:
        raise ValueError(f"spread_sd must be >= 0, got {spread_sd!r}")
    z = float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    s = math.sqrt(disagreement / n) if disagreement > 0 else 0.0
    total = math.hypot(s, spread_sd)
    if total == 0:
        return 1.0
    return float(norm.cdf((margin - z * s) / total))


def images_for_power(margin: float, disagreement: float, power: float = 0.9, confidence: float = 0.95) -> int:
    """The number of paired images at which :func:`noninferiority_power` reaches ``power``."""
    from scipy.stats import norm

    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    z = float(norm.ppf(1.0 - (1.0 - confidence) / 2.0)) + float(norm.ppf(power))
    return int(math.ceil(disagreement * (z / margin) ** 2))


def paired_verdict(name: str, parts: list[tuple[str, str, Comparison, dict[str, Any]]],
                   problems: list[str] | None = None, figures: dict[str, Any] | None = None):
    """A :class:`~stage1_core.gates.GateVerdict` from paired comparisons ``(key, what, comparison, evidence)``.

    It passes when every comparison passes and ``problems`` is empty; the message states each
    comparison's figures, CI, rule and power, so a failure reads with its numbers. The power counts
    val_test's sampling only: for a coverage clause, two policies certified on val_calib also land
    apart by the certificates' own spread, which it does not see (``noninferiority_power``'s
    ``spread_sd``).
    """
    from stage1_core.gates import GateVerdict

    problems = list(problems or [])
    lines, out = [], dict(figures or {})
    for key, what, comparison, evidence in parts:
        power = evidence.get("power_at_margin")
        power_text = (f"; n {evidence['n']}, disagreement {100 * evidence['disagreement']:.1f}%, power at this margin "
                      f"for equal models {power:.2f} (val_test sampling only)"
                      if comparison.direction == "non-inferiority" and power is not None else f"; n {evidence['n']}")
        line = comparison.describe(what) + power_text
        (lines if comparison.passed else problems).append(line)
        out.update(comparison.figures(f"{key}_"))
        out.update({f"{key}_{k}": v for k, v in evidence.items()})
    message = "; ".join(problems) if problems else "; ".join(lines)
    return GateVerdict(name, not problems, message, out)
