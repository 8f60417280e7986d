"""Which epoch a training run keeps: the best by its selection metric, optionally within an accuracy band.

Without a band the rule is the classic one: the best value of the selection metric on val_select
(earliest on ties, or the more accurate epoch for metrics in ``ties_by_accuracy``). With
``accuracy_tolerance`` the run maximises the selection metric among the epochs whose val_select
accuracy is within that tolerance of the run's best accuracy: coverage under an accuracy
constraint, as the phase gates judge a model (coverage and accuracy both non-inferior). The band
is relative to the best accuracy over the whole run, so an epoch chosen early can lose its place
when a later epoch is more accurate; :func:`live_candidates` says which epochs can still become
the choice, so a trainer keeps only their weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["EpochScore", "choose_epoch", "live_candidates"]

#: Float slack on the band's edge: accuracies are ratios of counts computed the same way.
_EDGE = 1e-12


@dataclass(frozen=True)
class EpochScore:
    """One epoch's selection value and val_select accuracy (fraction)."""

    epoch: int
    value: float
    accuracy: float


def _in_band(scores: Sequence[EpochScore], accuracy_tolerance: float | None) -> list[EpochScore]:
    finite = [s for s in scores if math.isfinite(s.value)]
    if accuracy_tolerance is None or not scores:
        return finite
    floor = max(s.accuracy for s in scores) - accuracy_tolerance - _EDGE
    return [s for s in finite if s.accuracy >= floor]


def _key(score: EpochScore, higher_is_better: bool, ties_by_accuracy: bool) -> tuple[float, float, int]:
    return (score.value if higher_is_better else -score.value, score.accuracy if ties_by_accuracy else 0.0, -score.epoch)


def choose_epoch(
    scores: Iterable[EpochScore],
    higher_is_better: bool,
    accuracy_tolerance: float | None = None,
    ties_by_accuracy: bool = False,
) -> int | None:
    """The kept epoch, or None when no epoch has a finite value."""
    if accuracy_tolerance is not None and not 0.0 <= accuracy_tolerance <= 1.0:
        raise ValueError(f"accuracy_tolerance must lie in [0, 1], got {accuracy_tolerance!r}")
    candidates = _in_band(list(scores), accuracy_tolerance)
    if not candidates:
        return None
    return max(candidates, key=lambda s: _key(s, higher_is_better, ties_by_accuracy)).epoch


def live_candidates(
    scores: Iterable[EpochScore],
    higher_is_better: bool,
    accuracy_tolerance: float | None,
    ties_by_accuracy: bool = False,
) -> set[int]:
    """Epochs that may still be chosen after more epochs: in the band of the best accuracy so far
    and not dominated by an in-band epoch that is at least as accurate and ranks above them (that
    one stays in the band as long as they do, since the best accuracy only rises)."""
    band = _in_band(list(scores), accuracy_tolerance)
    live = set()
    for score in band:
        key = _key(score, higher_is_better, ties_by_accuracy)
        if not any(other.accuracy >= score.accuracy and _key(other, higher_is_better, ties_by_accuracy) > key
                   for other in band):
            live.add(score.epoch)
    return live
