"""Paired bootstrap CIs of two exit decisions on the same images (stage1_core.metrics.paired)."""

from __future__ import annotations

import numpy as np
import pytest

from stage1_core.metrics.paired import paired_bootstrap_difference, paired_bootstrap_exit_accuracy_difference


def test_identical_policies_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    correct = rng.random(500) < 0.9
    exits = rng.random(500) < 0.7
    ci = paired_bootstrap_exit_accuracy_difference(correct, exits, exits, 300, 0.95, 0)
    assert ci["difference"] == 0.0 and ci["ci_lower"] == 0.0 and ci["ci_upper"] == 0.0
    assert ci["undefined_resamples"] == 0


def test_exit_accuracy_difference_point_and_interval():
    # Policy a exits 100 images with 90 right; b exits the first 50 of them, all right: a - b = -0.1.
    correct = np.r_[np.ones(50, bool), np.ones(40, bool), np.zeros(10, bool), np.ones(100, bool)]
    a = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    b = np.r_[np.ones(50, bool), np.zeros(150, bool)]
    ci = paired_bootstrap_exit_accuracy_difference(correct, a, b, 2000, 0.95, 1)
    assert ci["difference"] == pytest.approx(-0.1)
    assert ci["ci_lower"] < -0.1 < ci["ci_upper"] < 0.0
    # The standard error of a's accuracy (b is always 1.0): sqrt(0.9 * 0.1 / 100) = 0.03.
    assert ci["ci_upper"] - ci["ci_lower"] == pytest.approx(2 * 1.96 * 0.03, rel=0.25)


def test_policy_that_exits_nothing_in_a_resample_is_counted_not_used():
    correct = np.ones(40, bool)
    a = np.zeros(40, bool)
    a[0] = True  # one image: absent from about e^-1 of the resamples
    ci = paired_bootstrap_exit_accuracy_difference(correct, a, np.ones(40, bool), 500, 0.95, 2)
    assert 100 < ci["undefined_resamples"] < 260 and ci["difference"] == 0.0


def test_coverage_difference_matches_the_mean_difference():
    a = np.r_[np.ones(80), np.zeros(20)]
    b = np.r_[np.ones(70), np.zeros(30)]
    ci = paired_bootstrap_difference(a, b, 500, 0.9, 0)
    assert ci["difference"] == pytest.approx(0.1) and ci["ci_lower"] <= 0.1 <= ci["ci_upper"]


def test_ece_difference_recomputes_both_eces_on_paired_resamples():
    from stage1_core.calibration.gate import score_ece
    from stage1_core.metrics.paired import paired_bootstrap_ece_difference

    rng = np.random.default_rng(0)
    events = rng.integers(0, 2, 400).astype(float)
    good = np.clip(events * 0.8 + 0.1 + rng.normal(0, 0.05, 400), 0, 1)
    bad = np.clip(good + 0.3, 0, 1)

    ci = paired_bootstrap_ece_difference(bad, good, events, 300, 0.95, 1)
    assert ci["difference"] == pytest.approx(score_ece(bad, events) - score_ece(good, events))
    assert 0 < ci["ci_lower"] <= ci["difference"] <= ci["ci_upper"] and ci["n_resamples"] == 300
    # The same images in both arms of every resample: the same score differs by exactly 0.
    same = paired_bootstrap_ece_difference(good, good, events, 50, 0.95, 1)
    assert same["ci_lower"] == same["ci_upper"] == 0.0
    # Each resample recomputes both ECEs on one draw of the images (a per-resample loop agrees).
    draws = np.random.default_rng(1).integers(0, 400, size=(300, 400))
    loop = [score_ece(bad[i], events[i]) - score_ece(good[i], events[i]) for i in draws]
    assert ci["ci_lower"] == pytest.approx(np.percentile(loop, 2.5)) and ci["ci_upper"] == pytest.approx(np.percentile(loop, 97.5))
