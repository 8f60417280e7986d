import numpy as np
import pytest
from scipy import stats

from stage1_core.calibration.bounds import binomial_pvalue, fnr_upper_bound, is_certified, positives_needed

# METHODS.md section 1: one-sided 95% Clopper-Pearson upper bounds.
REFERENCE_BOUNDS = [
    (0, 50, 0.058155),
    (0, 100, 0.029513),
    (0, 149, 0.019905),
    (0, 150, 0.019773),
    (1, 150, 0.031234),
    (2, 300, 0.020836),
    (5, 500, 0.020910),
    (10, 1000, 0.016903),
]


@pytest.mark.parametrize(("k", "n", "expected"), REFERENCE_BOUNDS)
def test_clopper_pearson_reference_values(k, n, expected):
    assert fnr_upper_bound(k, n, 0.05) == pytest.approx(expected, abs=5e-7)


@pytest.mark.parametrize(("k", "needed"), [(0, 149), (1, 236), (2, 313), (3, 386), (4, 456), (5, 523)])
def test_positives_needed_reference_values(k, needed):
    assert positives_needed(0.02, 0.05, k) == needed
    assert binomial_pvalue(k, needed, 0.02) <= 0.05 < binomial_pvalue(k, needed - 1, 0.02)


def test_pvalue_and_bound_agree_everywhere():
    """p <= delta exactly when the Clopper-Pearson bound is <= alpha (METHODS section 1)."""
    ks, ns = np.meshgrid(np.arange(0, 12), np.arange(1, 700, 7))
    mask = ks <= ns
    k, n = ks[mask], ns[mask]
    for alpha, delta in [(0.02, 0.05), (0.05, 0.1), (0.1, 0.01)]:
        by_p = binomial_pvalue(k, n, alpha) <= delta
        by_bound = fnr_upper_bound(k, n, delta) <= alpha
        np.testing.assert_array_equal(by_p, by_bound)
        np.testing.assert_array_equal(is_certified(k, n, alpha, delta), by_p)


def test_matches_scipy_stats_definitions():
    k = np.array([0, 1, 3, 7, 20, 0])
    n = np.array([10, 40, 150, 600, 900, 3])
    np.testing.assert_allclose(fnr_upper_bound(k, n, 0.05), stats.beta.ppf(0.95, k + 1, n - k), rtol=1e-12)
    np.testing.assert_allclose(binomial_pvalue(k, n, 0.02), stats.binom.cdf(k, n, 0.02), rtol=1e-12)


def test_degenerate_counts():
    assert fnr_upper_bound(0, 0, 0.05) == 1.0
    assert fnr_upper_bound(7, 7, 0.05) == 1.0
    assert binomial_pvalue(0, 0, 0.02) == 1.0
    out = fnr_upper_bound(np.array([0, 3, 2]), np.array([10, 3, 0 + 2]), 0.05)
    assert isinstance(out, np.ndarray) and out.shape == (3,)
    assert out[0] == pytest.approx(1 - 0.05 ** (1 / 10))  # closed form for k = 0
    assert out[1] == 1.0 and out[2] == 1.0


def test_bound_is_monotone():
    n = np.arange(1, 400)
    b = fnr_upper_bound(np.zeros_like(n), n, 0.05)
    assert np.all(np.diff(b) < 0)
    assert fnr_upper_bound(3, 300, 0.01) > fnr_upper_bound(3, 300, 0.05)


@pytest.mark.parametrize(
    "call",
    [
        lambda: fnr_upper_bound(3, 2, 0.05),
        lambda: fnr_upper_bound(-1, 2, 0.05),
        lambda: fnr_upper_bound(0, 10, 0.0),
        lambda: fnr_upper_bound(0, 10, 1.0),
        lambda: binomial_pvalue(0, 10, 0.0),
        lambda: positives_needed(0.0, 0.05),
        lambda: positives_needed(0.02, 0.05, k=-1),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
