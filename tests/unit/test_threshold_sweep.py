import json

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import norm

from stage1_core.artifacts import schema_errors
from stage1_core.calibration.bounds import binomial_pvalue, positives_needed
from stage1_core.calibration.threshold_sweep import (
    METHODS,
    SEED_GRID,
    candidate_table,
    certify_softmax_threshold,
    select_candidates,
    thresholds_document,
)


class LogitNormalScores:
    """Softmax outputs with a known population FNR curve.

    logit(p1) ~ N(mu, sigma) for positives and N(-mu_neg, sigma) for negatives. A positive exits
    at threshold t iff |logit| >= s = logit(t) and is a false negative iff logit <= -s, so
    FNR(t) = Phi((-s - mu)/sigma) / (Phi((-s - mu)/sigma) + Phi((mu - s)/sigma)).
    """

    def __init__(self, mu, sigma, mu_neg, pi):
        self.mu, self.sigma, self.mu_neg, self.pi = mu, sigma, mu_neg, pi

    def sample(self, n, rng):
        y = (rng.uniform(size=n) < self.pi).astype(int)
        z = rng.normal(np.where(y == 1, self.mu, -self.mu_neg), self.sigma)
        p1 = expit(z)
        return np.stack([1 - p1, p1], axis=1), y

    def fnr(self, t):
        s = np.log(t / (1 - t))
        fn = norm.cdf((-s - self.mu) / self.sigma)
        return fn / (fn + norm.cdf((self.mu - s) / self.sigma))


# FNR at full coverage ~0.16, target 0.10 crossed near coverage 0.8: certification is tight.
GEN = LogitNormalScores(mu=1.5, sigma=1.5, mu_neg=1.5, pi=0.8)
TARGET, DELTA, N_CALIB = 0.10, 0.10, 300


def _probs(n=1000, seed=0, gen=GEN):
    return gen.sample(n, np.random.default_rng(seed))


def test_generator_fnr_curve_is_right():
    probs, y = _probs(200_000, seed=1)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    for t in (0.55, 0.7, 0.85):
        pos = (conf >= t) & (y == 1)
        assert ((pred == 0) & pos).sum() / pos.sum() == pytest.approx(GEN.fnr(t), abs=0.004)


def test_candidates_are_every_distinct_max_probability():
    probs, y = _probs(400)
    probs[:50] = probs[50:100]  # ties
    table = candidate_table(probs, y)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    np.testing.assert_array_equal(table.thresholds, np.unique(conf)[::-1])
    for j in (0, 5, len(table) // 2, len(table) - 1):
        exits = conf >= table.thresholds[j]
        assert table.n_exited[j] == exits.sum()
        assert table.n_exited_positives[j] == (exits & (y == 1)).sum()
        assert table.n_false_negatives[j] == (exits & (y == 1) & (pred == 0)).sum()
        assert table.n_exited_correct[j] == (exits & (pred == y)).sum()


@pytest.mark.parametrize("method", METHODS)
def test_certified_choice_is_consistent(method):
    probs, y = _probs(3000, seed=2)
    res = certify_softmax_threshold(probs, y, TARGET, DELTA, method=method)
    assert res.certified and res.method == method
    t = res.exit_threshold
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    exits = conf >= t
    pos = exits & (y == 1)
    assert res.coverage == pytest.approx(exits.mean())
    assert res.n_exited_positives == pos.sum()
    assert res.n_false_negatives == (pos & (pred == 0)).sum()
    assert res.fnr_on_exits == pytest.approx(res.n_false_negatives / res.n_exited_positives)
    assert res.exit_accuracy == pytest.approx((pred == y)[exits].mean())
    assert res.fnr_upper_bound <= TARGET
    assert binomial_pvalue(res.n_false_negatives, res.n_exited_positives, TARGET) <= res.test_level
    assert len(res.sweep_results) == len(np.unique(conf)) == res.n_candidates
    certified = [r for r in res.sweep_results if r["certified"]]
    assert max(r["coverage"] for r in certified) == res.coverage
    assert all(r["tested"] for r in certified)
    assert [g["threshold"] for g in res.grid_results] == list(SEED_GRID)


def test_default_beats_alternatives_and_levels():
    probs, y = _probs(3000, seed=2)
    results = {m: certify_softmax_threshold(probs, y, TARGET, DELTA, method=m) for m in METHODS}
    default = certify_softmax_threshold(probs, y, TARGET, DELTA)
    assert default.method == "multistart_fixed_sequence"
    assert default.test_level == pytest.approx(DELTA / 2)
    assert results["fixed_sequence"].test_level == DELTA
    assert results["bonferroni"].test_level == pytest.approx(DELTA / results["bonferroni"].n_candidates)
    assert default.coverage >= results["bonferroni"].coverage
    single = select_candidates(candidate_table(probs, y), TARGET, DELTA, "multistart_fixed_sequence", n_starts=1)
    fixed = select_candidates(candidate_table(probs, y), TARGET, DELTA, "fixed_sequence")
    assert single.chosen == fixed.chosen


def test_nothing_certifies_exits_nothing_and_says_why():
    probs, y = _probs(120, seed=4)
    res = certify_softmax_threshold(probs, y, 0.02, 0.05)
    assert not res.certified
    assert res.exit_threshold is None and res.coverage == 0.0
    assert res.fnr_on_exits is None and res.n_exited_positives == 0
    needed = positives_needed(0.02, 0.05 / 2, 0)
    assert f"at least {needed} exited positives" in res.reason
    assert "exits nothing" in res.reason
    assert len(res.sweep_results) > 0 and not any(r["certified"] for r in res.sweep_results)


def test_perfect_scores_exit_everything():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p1 = np.where(y == 1, rng.uniform(0.6, 1.0, 2000), rng.uniform(0.0, 0.4, 2000))
    res = certify_softmax_threshold(np.stack([1 - p1, p1], 1), y, 0.02, 0.05)
    assert res.certified and res.coverage == 1.0 and res.n_false_negatives == 0
    assert res.exit_threshold == pytest.approx(np.stack([1 - p1, p1], 1).max(axis=1).min())


def test_bad_arguments_raise():
    probs, y = _probs(50)
    with pytest.raises(ValueError, match="unknown certification method"):
        certify_softmax_threshold(probs, y, 0.02, 0.05, method="magic")
    with pytest.raises(ValueError):
        certify_softmax_threshold(probs, y, 0.0, 0.05)
    with pytest.raises(ValueError):
        certify_softmax_threshold(np.full((4, 3), 1 / 3), np.zeros(4, int), 0.02, 0.05)
    with pytest.raises(ValueError):
        certify_softmax_threshold(probs, y[:-1], 0.02, 0.05)


@pytest.mark.parametrize("n", [1000, 100])
def test_thresholds_document_is_schema_valid(n):
    probs, y = _probs(n, seed=2)
    res = certify_softmax_threshold(probs, y, 0.02, 0.05)
    doc = thresholds_document(res, {"ece": 0.03, "nll": 0.2}, "phase1:model_best:abc123", 0.5, 0.61)
    assert schema_errors(doc, "thresholds") == []
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["policy"] == "softmax" and doc["certified"] == res.certified
    broken = dict(doc, extra=1)
    assert any("extra" in e for e in schema_errors(broken, "thresholds"))
    flipped = dict(doc, certified=not doc["certified"])
    assert schema_errors(flipped, "thresholds")
    assert schema_errors(dict(doc, exit_threshold=0.3), "thresholds")
    with pytest.raises(ValueError):
        thresholds_document(res, {}, "", 0.5, 0.6)


def _violation_rate(method, reps, rule=None, seed=0):
    rng = np.random.default_rng(seed)
    violations = 0
    for _ in range(reps):
        probs, y = GEN.sample(N_CALIB, rng)
        if rule is None:
            t = certify_softmax_threshold(probs, y, TARGET, DELTA, method=method).exit_threshold
        else:
            t = rule(candidate_table(probs, y))
        violations += t is not None and GEN.fnr(t) > TARGET
    return violations / reps


def _naive_rule(table):
    """Largest coverage with empirical FNR <= target: no certificate, should fail validity."""
    with np.errstate(invalid="ignore", divide="ignore"):
        emp = table.n_false_negatives / table.n_exited_positives
    ok = np.flatnonzero(emp <= TARGET)
    return table.thresholds[ok.max()] if ok.size else None


def _mc_bound(reps):
    return DELTA + 3 * np.sqrt(DELTA * (1 - DELTA) / reps)


def test_certification_validity_default_method():
    """P(population FNR of the chosen threshold > target) <= delta, over 500 calibration draws."""
    reps = 500
    rate = _violation_rate("multistart_fixed_sequence", reps)
    assert rate <= _mc_bound(reps)
    # The same check rejects a procedure without a certificate.
    assert _violation_rate(None, reps, rule=_naive_rule) > _mc_bound(reps)


@pytest.mark.parametrize("method", ["sgr_binary_search", "fixed_sequence", "bonferroni"])
def test_certification_validity_other_methods(method):
    reps = 500
    assert _violation_rate(method, reps, seed=1) <= _mc_bound(reps)
