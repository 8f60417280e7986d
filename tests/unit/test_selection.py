from __future__ import annotations

import numpy as np
import pytest

from stage1_core.training.selection import EpochScore, choose_epoch, live_candidates


def scores(*rows: tuple[int, float, float]) -> list[EpochScore]:
    return [EpochScore(epoch, value, accuracy) for epoch, value, accuracy in rows]


def test_without_a_band_the_best_value_wins_earliest_on_ties():
    run = scores((1, 0.5, 0.80), (2, 0.7, 0.85), (3, 0.7, 0.90))
    assert choose_epoch(run, higher_is_better=True) == 2
    assert choose_epoch(run, higher_is_better=True, ties_by_accuracy=True) == 3
    assert choose_epoch(run, higher_is_better=False) == 1
    assert choose_epoch(scores((1, float("nan"), 0.9)), higher_is_better=True) is None


def test_the_band_is_relative_to_the_runs_best_accuracy():
    """Epoch 1 certifies most but is 3 points less accurate than the best epoch: outside a 1-point
    band, so the best coverage among epochs 2-4 (all within 1 point of 0.91) is kept."""
    run = scores((1, 0.90, 0.88), (2, 0.60, 0.905), (3, 0.75, 0.90), (4, 0.55, 0.91))
    assert choose_epoch(run, True) == 1
    assert choose_epoch(run, True, accuracy_tolerance=0.01) == 3
    assert choose_epoch(run, True, accuracy_tolerance=0.0) == 4
    assert choose_epoch(run, True, accuracy_tolerance=0.05) == 1
    with pytest.raises(ValueError, match="accuracy_tolerance"):
        choose_epoch(run, True, accuracy_tolerance=-0.1)


def test_live_candidates_drop_what_no_later_epoch_can_choose():
    run = scores((1, 0.90, 0.88), (2, 0.60, 0.905), (3, 0.75, 0.90), (4, 0.55, 0.91))
    # epoch 1 is out of the band; 2 is below 3 in value but more accurate, so a later, more
    # accurate epoch could leave 2 and 4 in the band without 3; 4 is the most accurate.
    assert live_candidates(run, True, 0.01) == {2, 3, 4}
    dominated = scores((1, 0.8, 0.90), (2, 0.7, 0.89))
    assert live_candidates(dominated, True, 0.05) == {1}


@pytest.mark.parametrize("seed", range(20))
def test_keeping_only_live_candidates_never_loses_the_final_choice(seed):
    """Streaming selection that keeps only live candidates' weights must still hold, at every
    epoch, the weights of whatever epoch the whole run finally chooses."""
    rng = np.random.default_rng(seed)
    n = 30
    run = [EpochScore(e, float(rng.choice([0.0, 0.5, 0.6, 0.7, 0.8])), float(rng.choice(np.linspace(0.85, 0.92, 8))))
           for e in range(n)]
    final = choose_epoch(run, True, 0.01, ties_by_accuracy=True)
    kept: set[int] = set()
    for t in range(n):
        kept = (kept | {t}) & live_candidates(run[: t + 1], True, 0.01, ties_by_accuracy=True)
        assert choose_epoch(run[: t + 1], True, 0.01, ties_by_accuracy=True) in kept
        if final <= t:
            assert final in kept
