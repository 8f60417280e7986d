"""The shared comparison rule of the acceptance criteria (stage1_core.acceptance.compare)."""

from __future__ import annotations

import pytest

from stage1_core.acceptance.compare import SLACK, compare


def test_non_inferiority_passes_at_the_margin_and_fails_beyond_it():
    assert compare(0.90, 0.91, margin=0.01).passed
    assert compare(0.90, 0.91 + 2 * SLACK, margin=0.01 + SLACK).passed
    drop = compare(0.889, 0.91, margin=0.01)
    assert not drop.passed and drop.shortfall == pytest.approx(0.021) and drop.difference == pytest.approx(-0.021)


def test_lower_is_better_turns_the_shortfall_around():
    assert compare(0.0140, 0.0143, margin=0, higher_is_better=False).passed
    assert not compare(0.0145, 0.0143, margin=0, higher_is_better=False).passed


def test_superiority_needs_a_gain_above_the_margin():
    assert compare(0.92, 0.90, margin=0.01, direction="superiority").passed
    assert not compare(0.91, 0.90, margin=0.01, direction="superiority").passed
    assert not compare(0.90, 0.90, margin=0, direction="superiority").passed


def test_figures_carry_the_ci_and_bad_arguments_are_refused():
    figures = compare(0.9, 0.8, margin=0.0, ci=(0.05, 0.15)).figures("coverage_")
    assert figures["coverage_ci_lower"] == 0.05 and figures["coverage_direction"] == "non-inferiority"
    with pytest.raises(ValueError, match="direction"):
        compare(1, 1, margin=0, direction="equivalence")
    with pytest.raises(ValueError, match="margin"):
        compare(1, 1, margin=-0.1)
