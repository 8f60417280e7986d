"""Exact binomial tests and Clopper-Pearson bounds for the FNR on exited positives.

Among the N calibration positives a policy exits, K are wrongly exited as negative. Given N,
K ~ Binomial(N, FNR). The p-value of H0 "FNR > alpha" is ``BinomCDF(K; N, alpha)`` and the
one-sided Clopper-Pearson upper bound at level 1 - delta is ``BetaInv(1 - delta; K + 1, N - K)``;
``p <= delta`` exactly when the bound is ``<= alpha``. Both accept arrays. They are evaluated with
``scipy.special.bdtr`` / ``betaincinv``, the functions behind ``scipy.stats.binom.cdf`` and
``scipy.stats.beta.ppf``, without the distribution-object overhead (the sweep calls them often).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

__all__ = ["fnr_upper_bound", "binomial_pvalue", "positives_needed", "is_certified"]


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


def _check_counts(k: np.ndarray, n: np.ndarray) -> None:
    if np.any(k < 0) or np.any(n < 0) or np.any(k > n):
        raise ValueError(f"need 0 <= k <= n, got k={k.tolist()!r}, n={n.tolist()!r}")


def fnr_upper_bound(k, n, delta: float):
    """One-sided Clopper-Pearson upper bound on a binomial rate at level ``1 - delta``.

    Returns 1.0 when ``k == n`` (which includes ``n == 0``: nothing observed, nothing bounded).
    Scalars in give a float out; arrays in give an array out.
    """
    _check_delta(delta)
    k_arr = np.asarray(k, dtype=np.int64)
    n_arr = np.asarray(n, dtype=np.int64)
    _check_counts(k_arr, n_arr)
    full = k_arr >= n_arr
    bound = np.ones(np.broadcast(k_arr, n_arr).shape, dtype=np.float64)
    if np.any(~full):
        kk, nn = np.broadcast_arrays(k_arr, n_arr)
        bound[~full] = special.betaincinv(kk[~full] + 1.0, (nn[~full] - kk[~full]).astype(np.float64), 1.0 - delta)
    return float(bound) if bound.ndim == 0 else bound


def binomial_pvalue(k, n, alpha: float):
    """Exact p-value ``BinomCDF(k; n, alpha)`` for H0 "rate > alpha" (1.0 when ``n == 0``)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (the target rate) must lie in (0, 1), got {alpha!r}")
    k_arr = np.asarray(k, dtype=np.int64)
    n_arr = np.asarray(n, dtype=np.int64)
    _check_counts(k_arr, n_arr)
    p = np.where(n_arr == 0, 1.0, special.bdtr(k_arr, n_arr, alpha))
    return float(p) if p.ndim == 0 else p


def is_certified(k, n, alpha: float, level: float):
    """Whether ``rate <= alpha`` is certified at significance ``level`` (p-value <= level)."""
    return np.asarray(binomial_pvalue(k, n, alpha)) <= level


@lru_cache(maxsize=256)
def positives_needed(target: float, delta: float, k: int = 0) -> int:
    """Smallest N such that K = ``k`` errors among N exited positives certify ``rate <= target``.

    Reference (target 0.02, delta 0.05): 149 with 0 errors, 236 with 1, 313 with 2.
    """
    _check_delta(delta)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must lie in (0, 1), got {target!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # The p-value decreases in n; bracket the answer, then bisect.
    lo = k + 1
    if binomial_pvalue(k, lo, target) <= delta:
        return lo
    hi = max(2 * lo, int(math.ceil((k + 1) / target)))
    while binomial_pvalue(k, hi, target) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if binomial_pvalue(k, mid, target) <= delta:
            hi = mid
        else:
            lo = mid
    return hi
