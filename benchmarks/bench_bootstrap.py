"""Vectorised bootstrap vs a per-resample Python loop: every evaluation metric, same resamples.

Both sides use the same index matrix, so they must agree to rounding; the script prints the
largest difference and the speed-up ratio (loop time / vectorised time).

    python benchmarks/bench_bootstrap.py [--n 10000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stage1_core.metrics import bootstrap as bs
from stage1_core.metrics.calibration import compute_brier, compute_ece, compute_nll
from stage1_core.metrics.classification import accuracy, balanced_accuracy, mcc
from stage1_core.metrics.exit import coverage_at_prior, exit_metrics
from stage1_core.metrics.selective import selective_metrics


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < 0.9).astype(int)
    z = rng.normal(np.where(labels == 1, 2.5, -2.0), 1.5)
    p1 = 1 / (1 + np.exp(-z))
    probs = np.stack([1 - p1, p1], axis=1)
    preds = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    return {
        "probs": probs,
        "labels": labels,
        "preds": preds,
        "conf": conf,
        "residuals": (preds != labels).astype(float),
        "exits": conf >= 0.7,
    }


def vectorised_statistic(d: dict[str, np.ndarray], prior: float) -> bs.Statistic:
    return bs.combine(
        bs.accuracy_statistic(d["labels"], d["preds"]),
        bs.balanced_accuracy_statistic(d["labels"], d["preds"]),
        bs.mcc_statistic(d["labels"], d["preds"]),
        bs.ece_statistic(d["probs"], d["labels"]),
        bs.nll_statistic(d["probs"], d["labels"]),
        bs.brier_statistic(d["probs"], d["labels"]),
        bs.selective_statistic(d["conf"], d["residuals"]),
        bs.coverage_statistic(d["exits"]),
        bs.coverage_at_prior_statistic(d["exits"], d["labels"], prior),
        bs.exit_statistic(d["exits"], d["preds"], d["labels"]),
    )


def loop_metrics(d: dict[str, np.ndarray], prior: float) -> dict[str, float]:
    """All metrics from the scalar implementations (what a naive bootstrap calls B times)."""
    y, p = d["labels"], d["preds"]
    out = {
        "accuracy": accuracy(y, p),
        "balanced_accuracy": balanced_accuracy(y, p),
        "mcc": mcc(y, p),
        "ece": compute_ece(d["probs"], y),
        "nll": compute_nll(d["probs"], y),
        "brier": compute_brier(d["probs"], y),
        **selective_metrics(d["conf"], d["residuals"]),
    }
    m = exit_metrics(d["exits"], p, y)
    out["coverage"] = m.coverage
    out["fnr_on_exited"] = np.nan if m.fnr_on_exited is None else m.fnr_on_exited
    out["exit_accuracy"] = np.nan if m.exit_accuracy is None else m.exit_accuracy
    out["coverage_at_deploy_prior"] = coverage_at_prior(d["exits"], y, prior)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--prior", type=float, default=0.5, help="deployment prior P(roadwork)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = make_data(args.n, args.seed)
    indices = bs.resample_indices(args.n, args.resamples, seed=args.seed)

    start = time.perf_counter()
    fast = bs.bootstrap(vectorised_statistic(data, args.prior), args.n, indices=indices)
    t_vec = time.perf_counter() - start

    start = time.perf_counter()
    rows = [loop_metrics({k: v[i] for k, v in data.items()}, args.prior) for i in indices]
    values = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    slow = {}
    for k, v in values.items():
        lo, hi = np.percentile(v[~np.isnan(v)], [2.5, 97.5])
        slow[k] = (np.nanmean(v), lo, hi)
    t_loop = time.perf_counter() - start

    diff = max(
        abs(a - b)
        for k, (mean, lo, hi) in slow.items()
        for a, b in ((fast[k].mean, mean), (fast[k].ci_lower, lo), (fast[k].ci_upper, hi))
    )
    print(f"{len(fast)} metrics x {args.resamples} resamples on {args.n} samples")
    print(f"vectorised: {t_vec:.2f} s   per-resample loop: {t_loop:.2f} s")
    print(f"largest |difference| in mean / CI bounds: {diff:.2e}")
    print(f"speed-up ratio (loop / vectorised): {t_loop / t_vec:.1f}x")


if __name__ == "__main__":
    main()
