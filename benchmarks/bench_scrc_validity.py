"""Validity and coverage of SCRC (phase 6) on scores with a known population FNR curve.

Generator (per scenario): y ~ Bernoulli(pi); model logit z | y ~ N(mu, sigma) for roadwork and
N(-mu_neg, sigma_neg) for none, except a fraction ``hard`` of roadwork images whose logit follows
the none law (with a calibrated argmax at 90% roadwork the FNR constraint would not bind otherwise); raw softmax p1 = sigmoid(temp * z) (overconfident for temp > 1);
raw gate logit u = conf * |z| + m[y, answer] + N(0, gate_noise), where ``answer`` is the calibrated
argmax, so the gate tracks confidence and, through ``m``, correctness. The Dirichlet calibrator
(for q) and a Platt gate calibrator (g = sigmoid(a u + b), fit on correctness) are fit once on a
separate large sample, as the pipeline fits them off val_calib. Every rule's population
coverage, FNR_on_exited and selected-positive miss rate are integrals over z on a fine grid (the
gate enters through a normal tail), so they are exact up to quadrature.

Per calibration draw (n_calib samples, NATIX-like 90% roadwork):

* SCRC-I (:func:`scrc_inductive`, each order): violation = population FNR_on_exited of the chosen
  (lambda1, lambda2) > target; the rate must stay <= delta up to Monte-Carlo error.
* SCRC-I as the pipeline runs it ("SCRC-I chosen"): the family (2-D frontier, gate-only or
  softmax-only) is chosen with :func:`choose_order` on a separate draw of the same size (val_select),
  then certified on the calibration draw; it must be as valid, and its coverage is the figure to
  compare with the better special case.
* naive 2-D control: the grid candidate with the most exits whose *empirical* FNR <= target, no
  multiplicity correction; it should violate far more often (shows the check can fail).
* gate-only (``certify_score_threshold`` on g, argmax-q answers) and softmax (on max q): the 1-D
  policies SCRC contains, certified the same way on the same draws.
* SCRC-T (:func:`scrc_transductive`, with an unlabelled test batch of ``n_test``): mean over draws
  of the population miss rate among selected positives (the CRC-controlled risk, must be
  <= target), plus its mean FNR_on_exited and violation rate (not guaranteed).

    python benchmarks/bench_scrc_validity.py [--draws 500] [--scenarios ...] [--orders frontier exit_count]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from stage1_core.calibration.dirichlet import DirichletCalibrator
from stage1_core.calibration.scrc import (
    ORDERS,
    choose_order,
    apply_gate_calibration,
    prediction_sets,
    scrc_candidate_counts,
    scrc_grid,
    scrc_inductive,
    scrc_transductive,
)
from stage1_core.calibration.threshold_sweep import score_candidate_table, select_candidates


@dataclass(frozen=True)
class Scenario:
    n_calib: int = 800
    pi: float = 0.9
    mu: float = 2.5
    sigma: float = 1.5
    mu_neg: float = 2.0
    sigma_neg: float = 1.5
    hard: float = 0.05  # fraction of positives whose logit follows the negatives' law
    temp: float = 3.0
    conf: float = 0.8
    # gate mean offsets m[y][answer]: correct answers on the diagonal
    m: tuple[tuple[float, float], tuple[float, float]] = ((1.0, -1.0), (-1.0, 1.0))
    gate_noise: float = 1.0
    target: float = 0.02
    delta: float = 0.05
    n_test: int = 200
    selection_rate: float = 0.8


SCENARIOS = {
    # population oracle coverage at FNR <= 2% (gate-only / softmax / best (lambda1, lambda2)):
    "natix-800 gate~correctness": Scenario(),  # .848 / .912 / .912
    "natix-800 gate strict on FN": Scenario(m=((0.5, 0.5), (-3.0, 0.5)), conf=0.3),  # .984 / .915 / .984
    "natix-800 mixed": Scenario(m=((0.5, 0.5), (-1.0, 0.5)), conf=0.3),  # .885 / .912 / .916
    "natix-800 weak gate": Scenario(m=((0.2, -0.2), (-0.2, 0.2)), conf=0.3),  # .134 / .912 / .912
}
DEFAULT_SCENARIOS = ("natix-800 gate~correctness", "natix-800 gate strict on FN", "natix-800 weak gate")


class GatedScores:
    """Samples and exact population statistics of one :class:`Scenario`."""

    def __init__(self, sc: Scenario, seed: int = 12345, grid_points: int = 6001):
        self.sc = sc
        rng = np.random.default_rng(seed)
        p, z, y = self._raw(60_000, rng)
        self.calibrator = DirichletCalibrator(reg_lambda=1e-3, reg_mu=1e-3).fit(p, y)
        answer = self.calibrator.predict(p)
        u = self._gate(z, y, answer, rng)
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(u[:, None], (answer == y).astype(int))
        self.gate_spec = {"method": "platt", "a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
        lo = min(sc.mu - 9 * sc.sigma, -sc.mu_neg - 9 * sc.sigma_neg)
        hi = max(sc.mu + 9 * sc.sigma, -sc.mu_neg + 9 * sc.sigma_neg)
        self.zz = np.linspace(lo, hi, grid_points)
        dz = self.zz[1] - self.zz[0]
        f_neg = stats.norm.pdf(self.zz, -sc.mu_neg, sc.sigma_neg)
        self.w1 = sc.pi * ((1 - sc.hard) * stats.norm.pdf(self.zz, sc.mu, sc.sigma) + sc.hard * f_neg) * dz
        self.w0 = (1 - sc.pi) * f_neg * dz
        self.qz = self.calibrator.predict_proba(self._probs(self.zz))
        self.answer_z = self.qz.argmax(axis=1)

    def _probs(self, z: np.ndarray) -> np.ndarray:
        p1 = expit(self.sc.temp * z)
        return np.stack([1 - p1, p1], axis=1)

    def _raw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sc = self.sc
        y = (rng.uniform(size=n) < sc.pi).astype(np.int64)
        easy = (y == 1) & (rng.uniform(size=n) >= sc.hard)
        z = np.where(easy, rng.normal(sc.mu, sc.sigma, n), rng.normal(-sc.mu_neg, sc.sigma_neg, n))
        return self._probs(z), z, y

    def _gate(self, z, y, answer, rng) -> np.ndarray:
        m = np.asarray(self.sc.m)
        return self.sc.conf * np.abs(z) + m[y, answer] + rng.normal(0.0, self.sc.gate_noise, z.shape[0])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(g, q, y)``: calibrated gate scores, calibrated probabilities, labels."""
        p, z, y = self._raw(n, rng)
        q = self.calibrator.predict_proba(p)
        u = self._gate(z, y, q.argmax(axis=1), rng)
        return apply_gate_calibration(u, self.gate_spec), q, y

    def _selected(self, lambda1: float | None, y: int) -> np.ndarray:
        """P(g >= lambda1 | z, y) on the z grid (lambda1 None: everything selected)."""
        if lambda1 is None or lambda1 <= 0.0:
            return np.ones_like(self.zz)
        if lambda1 >= 1.0:
            return np.zeros_like(self.zz)
        u_star = (logit(lambda1) - self.gate_spec["b"]) / self.gate_spec["a"]
        m = np.asarray(self.sc.m)[y, self.answer_z]
        return stats.norm.sf((u_star - self.sc.conf * np.abs(self.zz) - m) / self.sc.gate_noise)

    def population(self, lambda1: float | None, lambda2: float) -> dict[str, float]:
        """Population coverage, FNR_on_exited and miss rate among selected positives of (lambda1, lambda2)."""
        single = prediction_sets(self.qz, lambda2).sum(axis=1) == 1
        s1, s0 = self._selected(lambda1, 1), self._selected(lambda1, 0)
        fn = np.sum(self.w1 * s1 * (single & (self.answer_z == 0)))
        ep = np.sum(self.w1 * s1 * single)
        cov = ep + np.sum(self.w0 * s0 * single)
        return {"coverage": cov, "fnr": fn / ep if ep > 0 else 0.0, "sel_miss": fn / max(np.sum(self.w1 * s1), 1e-300)}


def naive_choice(g, q, y, target) -> tuple[float, float] | None:
    """Most-exits grid candidate with empirical FNR <= target (no certificate)."""
    l1s, l2s = scrc_grid(g, q)
    grid = scrc_candidate_counts(g, q, y, l1s, l2s)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (grid.n_exited_positives > 0) & (grid.n_false_negatives <= target * grid.n_exited_positives)
    if not ok.any():
        return None
    j = int(np.flatnonzero(ok)[np.argmax(grid.n_exited[ok])])
    return float(grid.lambda1[j]), float(grid.lambda2[j])


def certify_1d(scores, answers, y, target, delta) -> float | None:
    table = score_candidate_table(scores, answers, y)
    j = select_candidates(table, target, delta).chosen
    return None if j is None else float(table.thresholds[j])


def run_scenario(name: str, sc: Scenario, draws: int, seed: int, orders: list[str], chosen: bool = True) -> bool:
    gen = GatedScores(sc)
    rng = np.random.default_rng(seed)
    rules = [f"SCRC-I {o}" for o in orders] + (["SCRC-I chosen"] if chosen else []) + [
        "gate-only", "softmax", "naive 2-D (control)"]
    picked: dict[str, int] = {}
    cov = {r: np.zeros(draws) for r in rules}
    bad = {r: np.zeros(draws, dtype=bool) for r in rules}
    t_risk, t_fnr, t_cov = np.zeros(draws), np.zeros(draws), np.zeros(draws)
    for d in range(draws):
        g, q, y = gen.sample(sc.n_calib, rng)
        answers = q.argmax(axis=1)
        picks: dict[str, tuple[float | None, float] | None] = {}
        for o in orders:
            r = scrc_inductive(g, q, y, sc.target, sc.delta, order=o)
            picks[f"SCRC-I {o}"] = (r.lambda1, r.lambda2) if r.certified else None
        if chosen:
            g_sel, q_sel, y_sel = gen.sample(sc.n_calib, rng)
            order, _ = choose_order(g_sel, q_sel, y_sel, sc.target, sc.delta)
            picked[order] = picked.get(order, 0) + 1
            r = scrc_inductive(g, q, y, sc.target, sc.delta, order=order)
            picks["SCRC-I chosen"] = (r.lambda1, r.lambda2) if r.certified else None
        t = certify_1d(g, answers, y, sc.target, sc.delta)
        picks["gate-only"] = None if t is None else (t, 0.5)
        t = certify_1d(q.max(axis=1), answers, y, sc.target, sc.delta)
        picks["softmax"] = None if t is None else (None, min(max(float(np.nextafter(t, 0.0)), 0.5), 1.0))
        picks["naive 2-D (control)"] = naive_choice(g, q, y, sc.target)
        for rule, pick in picks.items():
            if pick is None:
                continue
            pop = gen.population(*pick)
            cov[rule][d] = pop["coverage"]
            bad[rule][d] = pop["fnr"] > sc.target
        gt, qt, _ = gen.sample(sc.n_test, rng)
        rt = scrc_transductive(g, q, y, gt, qt, sc.target, sc.selection_rate)
        if rt.certified:
            pop = gen.population(rt.lambda1, rt.lambda2)
            t_risk[d], t_fnr[d], t_cov[d] = pop["sel_miss"], pop["fnr"], pop["coverage"]
    print(f"[{name}] n_calib={sc.n_calib} pi={sc.pi} target={sc.target} delta={sc.delta}, {draws} draws")
    print(f"  {'rule':24s} {'violation':>9s} {'p(<=delta)':>10s} {'verdict':>8s} {'coverage':>8s}")
    valid = True
    for rule in rules:
        v = int(bad[rule].sum())
        p = stats.binom.sf(v - 1, draws, sc.delta) if v else 1.0
        verdict = "valid" if p > 1e-3 else "INVALID"
        if rule.startswith("SCRC") or rule in ("gate-only", "softmax"):
            valid &= verdict == "valid"
        print(f"  {rule:24s} {v / draws:9.4f} {p:10.3g} {verdict:>8s} {cov[rule].mean():8.4f}")
    if chosen:
        print(f"  SCRC-I chosen: families picked on the val_select draw {dict(sorted(picked.items()))}")
    se = t_risk.std(ddof=1) / np.sqrt(draws) if draws > 1 else 0.0
    ok_t = t_risk.mean() <= sc.target + 3 * se
    valid &= ok_t
    print(f"  SCRC-T (rate {sc.selection_rate}, n_test {sc.n_test}): mean selected-positive miss rate "
          f"{t_risk.mean():.4f} +- {se:.4f} (<= {sc.target}: {'ok' if ok_t else 'VIOLATED'}), "
          f"mean FNR_on_exited {t_fnr.mean():.4f}, P(FNR_on_exited > target) {np.mean(t_fnr > sc.target):.3f}, "
          f"coverage {t_cov.mean():.4f}")
    return valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=500, help="calibration draws per scenario")
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--orders", nargs="+", default=["frontier"], choices=list(ORDERS),
                        help="SCRC-I candidate orders to run (exit_count is much weaker, see scrc.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chosen", dest="chosen", action="store_false",
                        help="skip the pipeline's procedure (family chosen on a separate val_select draw)")
    args = parser.parse_args()
    start = time.perf_counter()
    valid = all([run_scenario(name, SCENARIOS[name], args.draws, args.seed, args.orders, args.chosen)
                 for name in args.scenarios])
    print(f"all certified rules valid: {valid} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
