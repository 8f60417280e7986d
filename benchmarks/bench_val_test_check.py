"""How often each val_test criterion fails a correct certificate, and how often it catches a broken one.

A policy is certified on val_calib (2% FNR on exits at delta 0.05, multi-start LTT) from a score
model with a known population FNR curve; val_test is then drawn either from the same population
(the certificate is correct with probability >= 1 - delta) or from a shifted one whose FNR at the
chosen threshold is 3% or 4%. For each, the two val_test criteria are applied:

* ``confirm`` (default): fail on significant evidence that FNR > target (exact binomial, alpha 0.05);
* ``bound``: demand a second certificate (Clopper-Pearson upper bound <= target).

    python benchmarks/bench_val_test_check.py [--draws 2000]

Printed: false-alarm rate on correct certificates, and detection rates at true FNR 3% and 4%.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import binom, norm

from stage1_core.calibration.bounds import fnr_upper_bound
from stage1_core.calibration.threshold_sweep import certify_score_threshold

TARGET, DELTA, ALPHA = 0.02, 0.05, 0.05
N_CALIB, N_TEST, POSITIVE_RATE = 800, 800, 0.9


def population_fnr(threshold: float, shift: float = 0.0) -> tuple[float, float]:
    """(P(exit | y=1), P(pred 0 and exit | y=1)) for a symmetric-score model with separation 2.2.

    Positives' logit margin ~ N(2.2 - shift, 1); a positive exits when |margin| >= t' (t' the
    logit of the threshold) and is missed when the margin is negative.
    """
    t = np.log(threshold / (1 - threshold))
    mu = 2.2 - shift
    exit_pos = norm.sf(t, mu) + norm.cdf(-t, mu)
    miss = norm.cdf(-t, mu)
    return exit_pos, miss


def draw(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (rng.random(n) < POSITIVE_RATE).astype(int)
    margin = np.where(y == 1, rng.normal(2.2 - shift, 1.0, n), rng.normal(-2.2, 1.0, n))
    p1 = 1 / (1 + np.exp(-margin))
    return np.maximum(p1, 1 - p1), (p1 >= 0.5).astype(int), y


def shift_for(threshold: float, true_fnr: float) -> float:
    """The positives' mean shift that makes FNR_on_exited at ``threshold`` equal ``true_fnr``."""
    lo, hi = 0.0, 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        exit_pos, miss = population_fnr(threshold, mid)
        lo, hi = (mid, hi) if miss / exit_pos < true_fnr else (lo, mid)
    return (lo + hi) / 2


def verdicts(k: int, n: int) -> tuple[bool, bool]:
    """(confirm passes, bound passes) for k misses among n exited positives on val_test."""
    if n == 0:
        return False, False
    return bool(binom.sf(k - 1, n, TARGET) > ALPHA), bool(fnr_upper_bound(k, n, DELTA) <= TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = {"correct": [], "fnr 3%": [], "fnr 4%": []}
    for _ in range(args.draws):
        conf, pred, y = draw(rng, N_CALIB)
        result = certify_score_threshold(conf, pred, y, TARGET, DELTA)
        if not result.certified:
            continue
        t = result.exit_threshold
        exit_pos, miss = population_fnr(t)
        if miss / exit_pos > TARGET:
            continue  # the (rare) invalid certificate is not a "correct" one
        for name, shift in (("correct", 0.0), ("fnr 3%", shift_for(t, 0.03)), ("fnr 4%", shift_for(t, 0.04))):
            conf_t, pred_t, y_t = draw(rng, N_TEST, shift)
            exits = (conf_t >= t) & (y_t == 1)
            rows[name].append(verdicts(int((exits & (pred_t == 0)).sum()), int(exits.sum())))
    print(f"target {TARGET}, delta {DELTA}, alpha {ALPHA}, n_calib {N_CALIB}, n_test {N_TEST}, "
          f"{POSITIVE_RATE:.0%} positives, {len(rows['correct'])} certified draws")
    print(f"{'val_test population':<22}{'confirm fails':>15}{'bound fails':>15}")
    for name, pairs in rows.items():
        arr = np.asarray(pairs, dtype=bool)
        print(f"{name:<22}{1 - arr[:, 0].mean():>15.3f}{1 - arr[:, 1].mean():>15.3f}")
    print("correct: the failure rate is a false alarm; fnr 3% / 4%: the failure rate is the detection rate")


if __name__ == "__main__":
    main()
