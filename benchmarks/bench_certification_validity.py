"""Validity of the certified exit threshold: P(population FNR of the chosen threshold > target) <= delta.

Long version of ``tests/unit/test_threshold_sweep.py::test_certification_validity_*``. For score
distributions with a known population FNR curve (logit-normal softmax outputs), draw many
independent calibration sets, certify a threshold on each, and count how often the chosen
threshold's *population* FNR exceeds the target. A valid method stays at or below delta up to
Monte-Carlo error; a naive rule (largest coverage with empirical FNR <= target, no certificate)
is run as a control and should fail. Also prints mean coverage relative to the oracle.

    python benchmarks/bench_certification_validity.py [--reps 1000] [--methods ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from bench_policy import LogitNormalScores
from stage1_core.calibration.threshold_sweep import METHODS, candidate_table, select_candidates

SCENARIOS = {
    # name: (n_calib, pi, mu, sigma, target, delta); negatives: logit ~ N(-2.0, 1.5)
    "natix-1000 2%/.05": (1000, 0.9, 2.5, 1.5, 0.02, 0.05),
    "natix-3000 2%/.05": (3000, 0.9, 2.5, 1.5, 0.02, 0.05),
    "balanced-2000 2%/.05": (2000, 0.5, 2.5, 1.5, 0.02, 0.05),
    "weak-400 10%/.10": (400, 0.8, 1.5, 1.5, 0.10, 0.10),
}


def naive_rule(table, target: float) -> int | None:
    with np.errstate(invalid="ignore", divide="ignore"):
        empirical = table.n_false_negatives / table.n_exited_positives
    ok = np.flatnonzero(empirical <= target)
    return int(ok.max()) if ok.size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1000, help="calibration draws per scenario")
    parser.add_argument("--methods", nargs="+", default=["multistart_fixed_sequence", "sgr_binary_search"],
                        choices=list(METHODS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    all_valid = True
    for name in args.scenarios:
        n_calib, pi, mu, sigma, target, delta = SCENARIOS[name]
        gen = LogitNormalScores(mu, sigma, 2.0, 1.5, pi)
        oracle = gen.coverage(gen.oracle_threshold(target))
        rng = np.random.default_rng(args.seed)
        rules = list(args.methods) + ["naive (no certificate)"]
        violations = dict.fromkeys(rules, 0)
        coverage = {r: [] for r in rules}
        for _ in range(args.reps):
            probs, labels = gen.sample(n_calib, rng)
            table = candidate_table(probs, labels)
            for rule in rules:
                if rule in METHODS:
                    j = select_candidates(table, target, delta, rule).chosen
                else:
                    j = naive_rule(table, target)
                t = None if j is None else float(table.thresholds[j])
                coverage[rule].append(0.0 if t is None else gen.coverage(t))
                violations[rule] += t is not None and gen.fnr(t) > target
        print(f"[{name}] n_calib={n_calib} pi={pi} target={target} delta={delta}, {args.reps} draws, "
              f"oracle coverage {oracle:.4f}")
        for rule in rules:
            v = violations[rule]
            rate = v / args.reps
            # one-sided binomial test of "violation rate <= delta"
            p = stats.binom.sf(v - 1, args.reps, delta) if v else 1.0
            verdict = "valid" if p > 1e-3 else "INVALID"
            if rule in METHODS and verdict != "valid":
                all_valid = False
            print(f"  {rule:26s} violation rate {rate:.4f} (<= {delta} required; p={p:.3g}: {verdict}), "
                  f"coverage/oracle {np.mean(coverage[rule]) / oracle:.3f}")
    print(f"all certified methods valid: {all_valid} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
