"""Coverage of the certified softmax exit threshold vs MAPIE and vs the population oracle.

Scores come from a generator with a known population FNR curve (logit-normal softmax outputs,
NATIX-like 90% positives), so each chosen threshold is judged by its *population* coverage and
FNR. On the same calibration draws and the same delta:

* ours: ``certify_softmax_threshold`` (default method);
* MAPIE: ``mapie.risk_control.BinaryClassificationController`` (Learn-then-Test with binomial
  p-values) on a grid of ~20 thresholds, none so high that no positive exits. MAPIE gets its best
  fair setting: two grid designs (calibration-quantile and uniform in t) crossed with its FWER
  procedures (Bonferroni-Holm through the abstention API; fixed-sequence with 1, 2 and 4 starts
  through a 1-D encoding); the best combination on average is reported;
* oracle: the population threshold where FNR(t) = target (largest coverage with FNR <= target).

Runs a few scenarios (calibration size, class balance, model quality) and prints, per scenario
and on average, the coverage ratios ours/MAPIE (target >= 1.1; against MAPIE's abstention API
with Holm, and against its best setting overall) and ours/oracle, plus how often each method's
population FNR exceeded the target (must stay <= delta up to Monte-Carlo error).

    python benchmarks/bench_policy.py [--reps 100] [--scenarios natix-1000 ...]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm

from stage1_core.calibration.threshold_sweep import certify_softmax_threshold


class LogitNormalScores:
    """logit(p1) ~ N(mu, sigma) for positives, N(-mu_neg, sigma_neg) for negatives."""

    def __init__(self, mu: float, sigma: float, mu_neg: float, sigma_neg: float, pi: float):
        self.mu, self.sigma, self.mu_neg, self.sigma_neg, self.pi = mu, sigma, mu_neg, sigma_neg, pi

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.uniform(size=n) < self.pi).astype(int)
        z = np.where(y == 1, rng.normal(self.mu, self.sigma, n), rng.normal(-self.mu_neg, self.sigma_neg, n))
        p1 = expit(z)
        return np.stack([1 - p1, p1], axis=1), y

    def _tails(self, t: float, mu: float, sigma: float) -> tuple[float, float]:
        s = np.log(t / (1 - t))
        return norm.cdf((-s - mu) / sigma), norm.sf((s - mu) / sigma)  # (exit low, exit high)

    def fnr(self, t: float) -> float:
        low, high = self._tails(t, self.mu, self.sigma)
        return low / (low + high)

    def coverage(self, t: float) -> float:
        pos = sum(self._tails(t, self.mu, self.sigma))
        neg = sum(self._tails(t, -self.mu_neg, self.sigma_neg))
        return self.pi * pos + (1 - self.pi) * neg

    def oracle_threshold(self, target: float) -> float:
        lo, hi = 0.5 + 1e-12, 1 - 1e-12
        if self.fnr(lo) <= target:
            return lo
        return brentq(lambda t: self.fnr(t) - target, lo, hi)


def mapie_grids(probs: np.ndarray, labels: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Two ~``size``-point grids, each cut to thresholds where at least one positive exits."""
    conf = probs.max(axis=1)
    top_positive = conf[labels == 1].max()
    quantile = np.quantile(conf, 1 - np.linspace(0.05, 1.0, size))  # coverage 5%, 10%, ..., 100%
    uniform = np.linspace(0.5, top_positive, size)
    return {name: np.unique(np.minimum(g, top_positive)) for name, g in (("quantile", quantile), ("uniform", uniform))}


def mapie_threshold(probs, labels, grid, target, delta, fwer) -> float | None:
    """Threshold MAPIE certifies (largest coverage among its valid ones), None if none."""
    from mapie.risk_control import BinaryClassificationController, BinaryRisk
    from mapie.risk_control.fwer_control import FWERFixedSequenceTesting

    pred = probs.argmax(axis=1)
    if fwer == "bonferroni_holm":
        # Abstention API: multi-dimensional parameters, NaN prediction = deferred.
        def predict(x, t):
            return np.where(x.max(axis=1) >= t, x.argmax(axis=1), np.nan)

        fnr = BinaryRisk(
            risk_occurrence=lambda y, p: p == 0,
            risk_condition=lambda y, p: (y == 1) & ~np.isnan(p),
            higher_is_better=False,
        )
        controller = BinaryClassificationController(
            predict_function=predict, risk=fnr, target_level=target, confidence_level=1 - delta,
            best_predict_param_choice="abstention_rate", list_predict_params=grid[:, None],
            fwer_method="bonferroni_holm",
        )
        controller.calibrate(probs, labels)
        best = controller.best_predict_param
        return None if best is None else float(best[0])
    # 1-D encoding so MAPIE's fixed-sequence procedures apply: "prediction" 1 = exit
    # (max p >= lambda); y codes 0 = negative, 1 = positive predicted positive, 2 = missed positive.
    codes = np.where(labels == 0, 0, np.where(pred == 1, 1, 2))
    fnr = BinaryRisk(
        risk_occurrence=lambda y, p: (p == 1) & (y == 2),
        risk_condition=lambda y, p: (p == 1) & (y >= 1),
        higher_is_better=False,
    )
    coverage = BinaryRisk(
        risk_occurrence=lambda y, p: p == 0,
        risk_condition=lambda y, p: np.ones(len(y), dtype=bool),
        higher_is_better=False,
    )
    controller = BinaryClassificationController(
        predict_function=lambda x: np.stack([1 - x.max(axis=1), x.max(axis=1)], axis=1),
        risk=fnr, target_level=target, confidence_level=1 - delta,
        best_predict_param_choice=coverage, list_predict_params=grid,
        fwer_method=FWERFixedSequenceTesting(n_starts=fwer),
    )
    controller.calibrate(probs, codes)
    return controller.best_predict_param


SCENARIOS = {
    # name: (n_calib, pi, mu, sigma) - negatives: logit ~ N(-2.0, 1.5)
    "natix-2000": (2000, 0.9, 2.5, 1.5),
    "natix-1000": (1000, 0.9, 2.5, 1.5),
    "natix-600": (600, 0.9, 2.5, 1.5),
    "harder-1500": (1500, 0.9, 2.0, 1.5),
    "balanced-1000": (1000, 0.5, 2.5, 1.5),
}
SETTINGS = [(g, f) for g in ("quantile", "uniform") for f in ("bonferroni_holm", 1, 2, 4)]


def run_scenario(name: str, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, float]:
    n_calib, pi, mu, sigma = SCENARIOS[name]
    gen = LogitNormalScores(mu, sigma, 2.0, 1.5, pi)
    t_star = gen.oracle_threshold(args.target)
    oracle = gen.coverage(t_star)
    ours, ours_viol = [], 0
    mapie = {s: [] for s in SETTINGS}
    mapie_viol = {s: 0 for s in SETTINGS}
    for _ in range(args.reps):
        probs, labels = gen.sample(n_calib, rng)
        t = certify_softmax_threshold(probs, labels, args.target, args.delta).exit_threshold
        ours.append(0.0 if t is None else gen.coverage(t))
        ours_viol += t is not None and gen.fnr(t) > args.target
        grids = mapie_grids(probs, labels, args.grid_size)
        for grid_name, fwer in SETTINGS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tm = mapie_threshold(probs, labels, grids[grid_name], args.target, args.delta, fwer)
            mapie[(grid_name, fwer)].append(0.0 if tm is None else gen.coverage(tm))
            mapie_viol[(grid_name, fwer)] += tm is not None and gen.fnr(tm) > args.target
    mean = {s: float(np.mean(c)) for s, c in mapie.items()}
    holm = max((s for s in SETTINGS if s[1] == "bonferroni_holm"), key=mean.get)
    best = max(SETTINGS, key=mean.get)
    ours_cov = float(np.mean(ours))
    print(f"[{name}] n_calib={n_calib} pi={pi} mu={mu} sigma={sigma}: oracle t={t_star:.4f} "
          f"coverage {oracle:.4f}")
    print(f"  ours (default method)          coverage {ours_cov:.4f}  FNR>target {ours_viol}/{args.reps}")
    for (grid_name, fwer), cov in mean.items():
        label = fwer if fwer == "bonferroni_holm" else f"fixed_sequence x{fwer}"
        print(f"  MAPIE {grid_name:8s} {label:19s} coverage {cov:.4f}  "
              f"FNR>target {mapie_viol[(grid_name, fwer)]}/{args.reps}")

    def ratio(x: float, y: float) -> float:
        return x / y if y > 0 else float("inf")

    out = {
        "vs_mapie_holm": ratio(ours_cov, mean[holm]),
        "vs_mapie_best": ratio(ours_cov, mean[best]),
        "vs_oracle": ours_cov / oracle,
    }
    print(f"  ratio ours/MAPIE abstention API (Holm, grid={holm[0]}): {out['vs_mapie_holm']:.3f}")
    print(f"  ratio ours/MAPIE best setting ({best[0]}, {best[1]}):  {out['vs_mapie_best']:.3f}")
    print(f"  ratio ours/oracle: {out['vs_oracle']:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=100, help="independent calibration draws per scenario")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--grid-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    results = {name: run_scenario(name, args, rng) for name in args.scenarios}
    print(f"target FNR {args.target}, delta {args.delta}, {args.reps} draws per scenario, "
          f"{time.perf_counter() - start:.1f} s")
    for key, label in (("vs_mapie_holm", "ours/MAPIE abstention API (Holm)"),
                       ("vs_mapie_best", "ours/MAPIE best setting"), ("vs_oracle", "ours/oracle")):
        values = [r[key] for r in results.values()]
        print(f"coverage ratio {label}: mean {np.mean(values):.3f}, min {np.min(values):.3f}"
              + ("  (target >= 1.1)" if key != "vs_oracle" else ""))


if __name__ == "__main__":
    main()
