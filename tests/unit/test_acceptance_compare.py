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


def test_a_ci_puts_the_burden_of_proof_on_the_claim():
    from stage1_core.acceptance.compare import compare

    # Point estimate 1.5 points down, inside a 2-point margin; the CI's lower end at -2.6: not shown.
    assert compare(0.905, 0.92, margin=0.02).passed
    assert not compare(0.905, 0.92, margin=0.02, ci=(-0.026, -0.004)).passed
    assert compare(0.905, 0.92, margin=0.02, ci=(-0.019, -0.004)).passed
    # Superiority: a positive point gain with a CI across the margin fails; clear of it passes.
    assert not compare(0.72, 0.70, margin=0.0, direction="superiority", ci=(-0.001, 0.04)).passed
    assert compare(0.72, 0.70, margin=0.0, direction="superiority", ci=(0.001, 0.04)).passed
    # Lower is better (AUGRC): the gain's worst end is minus the CI's upper end of current - reference.
    assert compare(0.010, 0.014, margin=0.0, direction="superiority", higher_is_better=False,
                   ci=(-0.007, -0.001)).passed
    assert not compare(0.010, 0.014, margin=0.0, direction="superiority", higher_is_better=False,
                       ci=(-0.007, 0.0004)).passed


def test_paired_compare_reports_n_disagreement_and_power():
    import numpy as np

    from stage1_core.acceptance.compare import paired_compare

    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.9).astype(float)
    b = a.copy()
    b[:50] = 1 - b[:50]
    comparison, evidence = paired_compare(a, b, margin=0.02, direction="non-inferiority", n_resamples=500,
                                          confidence=0.95, seed=1)
    assert evidence["n"] == 1000 and evidence["disagreement"] == 0.05
    assert comparison.ci is not None and comparison.ci[0] < comparison.difference < comparison.ci[1]
    assert 0 < evidence["power_at_margin"] < 1


def test_noninferiority_power_matches_a_simulation_of_equal_models():
    import numpy as np

    from stage1_core.acceptance.compare import images_for_power, noninferiority_power

    n, d, margin = 800, 0.06, 0.02
    predicted = noninferiority_power(margin, n, d)
    # Equal models: each image disagrees with probability d, the disagreement's direction a coin toss.
    rng = np.random.default_rng(0)
    runs, passed = 4000, 0
    z = 1.959963984540054
    for _ in range(runs):
        diff = rng.choice([-1.0, 0.0, 1.0], size=n, p=[d / 2, 1 - d, d / 2])
        lower = diff.mean() - z * diff.std(ddof=1) / np.sqrt(n)
        passed += lower >= -margin
    assert abs(passed / runs - predicted) < 0.03
    # Reference values: sigma = sqrt(0.06 / 800) = 0.866 points, so 90% power needs 3.24 sigma = 2.81 points.
    assert noninferiority_power(0.0281, 800, 0.06) == pytest.approx(0.90, abs=0.005)
    assert images_for_power(0.02, 0.06) == 1577
    assert noninferiority_power(0.02, 800, 0.0) == 1.0


def test_noninferiority_power_with_a_spread_matches_a_simulation_and_reduces_to_the_sampling_power():
    import numpy as np

    from stage1_core.acceptance.compare import noninferiority_power

    n, d, margin, spread = 2346, 0.09, 0.045, 0.03
    predicted = noninferiority_power(margin, n, d, spread_sd=spread)
    # Equal models whose policies differ by a random shift (two certificates' thresholds) of sd
    # `spread`: the shift moves the difference's mean, the images add the paired sampling noise.
    rng = np.random.default_rng(1)
    runs, passed = 4000, 0
    z = 1.959963984540054
    for _ in range(runs):
        shift = float(np.clip(rng.normal(0.0, spread), -d, d))  # a shift beyond d cannot be drawn
        p_up = d / 2 + shift / 2
        diff = rng.choice([-1.0, 0.0, 1.0], size=n, p=[d - p_up, 1 - d, p_up])
        lower = diff.mean() - z * diff.std(ddof=1) / np.sqrt(n)
        passed += lower >= -margin
    assert abs(passed / runs - predicted) < 0.03
    # Sampling alone gives this margin power ~1 here; the spread brings it to ~0.86.
    assert noninferiority_power(margin, n, d) > 0.999
    assert predicted == pytest.approx(0.86, abs=0.01)
    assert noninferiority_power(margin, n, d, spread_sd=0.0) == noninferiority_power(margin, n, d)
    with pytest.raises(ValueError, match="spread_sd"):
        noninferiority_power(margin, n, d, spread_sd=-0.01)
