import json

import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import norm

from stage1_core.artifacts import schema_errors
from stage1_core.calibration.bounds import positives_needed
from stage1_core.calibration.scrc import (
    MIN_TEST_BATCH,
    ORDERS,
    prediction_sets,
    scrc_candidate_counts,
    scrc_exits,
    scrc_grid,
    scrc_inductive,
    scrc_transductive,
    scrcparams_document,
    set_statistics,
)

TARGET, DELTA = 0.02, 0.05
GATE = {"method": "platt", "a": 1.0, "b": 0.0}
DIRICHLET = {"method": "dirichlet", "n_classes": 2, "W": [[1.0, 0.0], [0.0, 1.0]], "b": [0.0, 0.0]}


def binary(q1):
    q1 = np.asarray(q1, dtype=np.float64)
    return np.stack([1.0 - q1, q1], axis=1)


class GatedGenerator:
    """q1 = sigmoid(z + 1.5); z | roadwork ~ N(2.5, 1.5) except a fraction ``hard`` drawn like negatives,
    z | none ~ N(-2, 1.5); gate logit u = 0.5 |z| + m[y, answer] + N(0, 1), g = sigmoid(u).

    Population rates of any (lambda1, lambda2) are integrals over z (the gate enters through a
    normal tail), exact up to quadrature.
    """

    m = np.array([[0.5, 0.5], [-1.5, 0.5]])
    shift = 1.5

    def __init__(self, pi=0.9, hard=0.05):
        self.pi, self.hard = pi, hard
        self.zz = np.linspace(-14.0, 14.0, 4001)
        dz = self.zz[1] - self.zz[0]
        f_neg = norm.pdf(self.zz, -2.0, 1.5)
        self.w1 = pi * ((1 - hard) * norm.pdf(self.zz, 2.5, 1.5) + hard * f_neg) * dz
        self.w0 = (1 - pi) * f_neg * dz
        self.qz = binary(expit(self.zz + self.shift))
        self.answer_z = self.qz.argmax(axis=1)

    def sample(self, n, rng):
        y = (rng.uniform(size=n) < self.pi).astype(np.int64)
        easy = (y == 1) & (rng.uniform(size=n) >= self.hard)
        z = np.where(easy, rng.normal(2.5, 1.5, n), rng.normal(-2.0, 1.5, n))
        q = binary(expit(z + self.shift))
        u = 0.5 * np.abs(z) + self.m[y, q.argmax(axis=1)] + rng.normal(size=n)
        return expit(u), q, y

    def _sel(self, lambda1, y):
        if lambda1 is None or lambda1 <= 0:
            return np.ones_like(self.zz)
        return norm.sf(logit(lambda1) - 0.5 * np.abs(self.zz) - self.m[y, self.answer_z])

    def population(self, lambda1, lambda2):
        single = prediction_sets(self.qz, lambda2).sum(axis=1) == 1
        s1 = self._sel(lambda1, 1)
        fn = np.sum(self.w1 * s1 * (single & (self.answer_z == 0)))
        ep = np.sum(self.w1 * s1 * single)
        return {"fnr": fn / ep if ep else 0.0, "sel_miss": fn / np.sum(self.w1 * s1),
                "coverage": ep + np.sum(self.w0 * self._sel(lambda1, 0) * single)}


# ----- prediction sets and the exit rule --------------------------------------------------


def test_prediction_sets_values_and_nesting():
    q = binary([0.05, 0.3, 0.5, 0.7, 0.97])
    np.testing.assert_array_equal(prediction_sets(q, 0.5), [[1, 0], [1, 0], [1, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(prediction_sets(q, 0.0), np.zeros((5, 2), dtype=bool))
    np.testing.assert_array_equal(prediction_sets(q, 1.0), np.ones((5, 2), dtype=bool))
    np.testing.assert_array_equal(prediction_sets(q, 0.1).sum(axis=1), [1, 0, 0, 0, 1])  # empty sets below 0.5
    rng = np.random.default_rng(0)
    q = binary(rng.uniform(size=300))
    previous = prediction_sets(q, 0.0)
    for lam in np.linspace(0.0, 1.0, 41):
        sets = prediction_sets(q, lam)
        assert np.all(sets >= previous), lam  # nested: C(x; l) grows with l
        previous = sets


def test_prediction_sets_reject_bad_input():
    with pytest.raises(ValueError, match="lambda2"):
        prediction_sets(binary([0.3]), 1.5)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        prediction_sets(np.full((2, 3), 1 / 3), 0.5)
    with pytest.raises(TypeError):
        prediction_sets(binary([0.3]), None)


def test_exits_are_exactly_the_selected_singletons():
    rng = np.random.default_rng(1)
    g, q, _ = GatedGenerator().sample(500, rng)
    for lam1 in (0.0, 0.6, 0.9):
        for lam2 in (0.3, 0.5, 0.8, 0.99):
            exits, answer, sets = scrc_exits(g, q, lam1, lam2)
            full = prediction_sets(q, lam2)
            np.testing.assert_array_equal(exits, (g >= lam1) & (full.sum(axis=1) == 1))
            np.testing.assert_array_equal(sets[g >= lam1], full[g >= lam1])
            assert not sets[g < lam1].any()
            np.testing.assert_array_equal(answer[exits], full[exits, 1].astype(int))
            np.testing.assert_array_equal(answer[exits], q[exits].argmax(axis=1))
            if lam2 >= 0.5:  # binary: singleton iff max q > lambda2 (no ties in these draws)
                np.testing.assert_array_equal(full.sum(axis=1) == 1, q.max(axis=1) > lam2)
    exits, _, sets = scrc_exits(g, q, None, None)
    assert not exits.any() and not sets.any()


def test_set_statistics():
    g = np.array([0.9, 0.9, 0.9, 0.9, 0.1])
    q = binary([0.95, 0.6, 0.2, 0.45, 0.99])
    y = np.array([1, 0, 0, 1, 1])
    s = set_statistics(g, q, y, 0.5, 0.7)  # sets: {1}, {0,1}, {0}, {0,1}; last not selected
    assert s == pytest.approx({"selection_rate": 0.8, "singleton_rate": 0.5, "full_rate": 0.5,
                               "empty_rate": 0.0, "set_coverage": 1.0})
    s = set_statistics(g, q, y, 0.5, 0.3)  # C = {y : q_y >= 0.7}: {1}, {}, {0}, {}
    assert s == pytest.approx({"selection_rate": 0.8, "singleton_rate": 0.5, "full_rate": 0.0,
                               "empty_rate": 0.5, "set_coverage": 0.5})
    assert set_statistics(g, q, y, None, None)["singleton_rate"] is None
    assert set_statistics(g, q, y, 0.95, 0.7)["selection_rate"] == 0.0


# ----- SCRC-I -------------------------------------------------------------------------------


def test_grid_has_both_extremes_and_uses_inputs_only():
    rng = np.random.default_rng(2)
    g, q, _ = GatedGenerator().sample(400, rng)
    l1, l2 = scrc_grid(g, q, 20, 25)
    assert l1.min() == g.min() and len(l1) <= 20 and np.all(np.diff(l1) > 0)
    assert l2.min() == 0.5 and l2.max() <= 1.0 and len(l2) <= 25 and np.all(np.diff(l2) > 0)
    assert set(l1.tolist()) <= set(g.tolist())  # thresholds are calibration scores
    # the top-ranked lambda1 selects the top 1/20 of the inputs
    assert np.sum(g >= l1.max()) == 20
    with pytest.raises(ValueError, match="grid sizes"):
        scrc_grid(g, q, 0, 10)


def test_candidate_counts_match_brute_force():
    rng = np.random.default_rng(3)
    g, q, y = GatedGenerator().sample(300, rng)
    l1, l2 = scrc_grid(g, q, 12, 9)
    grid = scrc_candidate_counts(g, q, y, l1, l2)
    assert grid.n_exited.shape == (len(l1) * len(l2),)
    for j in range(0, grid.n_exited.size, 7):
        exits, answer, _ = scrc_exits(g, q, grid.lambda1[j], grid.lambda2[j])
        pos = exits & (y == 1)
        assert grid.n_exited[j] == exits.sum()
        assert grid.n_pred_pos[j] == (exits & (answer == 1)).sum()
        assert grid.n_exited_positives[j] == pos.sum()
        assert grid.n_false_negatives[j] == (pos & (answer == 0)).sum()
        assert grid.n_correct[j] == (exits & (answer == y)).sum()
        assert 0.0 <= grid.proxy_fnr[j] <= 1.0


def test_candidate_counts_do_not_depend_on_chunking(monkeypatch):
    import stage1_core.calibration.scrc as scrc

    rng = np.random.default_rng(31)
    g, q, y = GatedGenerator().sample(250, rng)
    l1, l2 = scrc_grid(g, q, 15, 11)
    whole = scrc_candidate_counts(g, q, y, l1, l2)
    monkeypatch.setattr(scrc, "_CHUNK_ELEMENTS", 7 * 250 * 2)  # two lambda2 values per chunk
    chunked = scrc_candidate_counts(g, q, y, l1, l2)
    for name in ("lambda1", "lambda2", "n_exited", "n_exited_positives", "n_false_negatives", "proxy_fnr"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(chunked, name))


@pytest.mark.parametrize("order", ORDERS)
def test_inductive_certifies_and_reports_the_chosen_candidate(order):
    rng = np.random.default_rng(4)
    g, q, y = GatedGenerator().sample(1500, rng)
    r = scrc_inductive(g, q, y, TARGET, DELTA, order=order, n_lambda1=30, n_lambda2=30)
    assert r.certified and r.reason is None and r.variant == "SCRC-I" and r.guarantee == "pac"
    assert r.fnr_bound <= TARGET and r.test_level == pytest.approx(DELTA / 2)
    exits, answer, _ = scrc_exits(g, q, r.lambda1, r.lambda2)
    np.testing.assert_array_equal(r.calib_exits, exits)
    pos = exits & (y == 1)
    assert r.n_exited == exits.sum() and r.coverage == pytest.approx(exits.mean())
    assert r.n_exited_positives == pos.sum() and r.n_false_negatives == (pos & (answer == 0)).sum()
    assert r.fnr_on_exits == pytest.approx(r.n_false_negatives / r.n_exited_positives)
    certified = [row for row in r.sweep_results if row["certified"]]
    assert certified and max(row["n_exited"] for row in certified) == r.n_exited
    assert all(row["fnr_upper_bound"] <= TARGET for row in certified)
    exits_seq = [row["n_exited"] for row in r.sweep_results]
    assert exits_seq == sorted(exits_seq)  # most conservative first
    # without a certificate the coverage at full exit would break the target on this generator
    assert GatedGenerator().population(None, 0.5)["fnr"] > TARGET


def test_long_sequences_keep_only_tested_rows():
    rng = np.random.default_rng(32)
    g, q, y = GatedGenerator().sample(1000, rng)
    r = scrc_inductive(g, q, y, TARGET, DELTA, order="exit_count", n_lambda1=60, n_lambda2=60)
    assert r.n_candidates > 2000 and r.method_params["sweep_rows"] == "tested"
    assert r.sweep_results and all(row["tested"] for row in r.sweep_results)
    assert scrc_inductive(g, q, y, TARGET, DELTA, n_lambda1=20, n_lambda2=20).method_params["sweep_rows"] == "all"


def test_inductive_order_does_not_depend_on_labels():
    rng = np.random.default_rng(5)
    g, q, y = GatedGenerator().sample(800, rng)
    a = scrc_inductive(g, q, y, TARGET, DELTA, n_lambda1=20, n_lambda2=20)
    b = scrc_inductive(g, q, rng.permutation(y), TARGET, DELTA, n_lambda1=20, n_lambda2=20)
    key = [(r["lambda1"], r["lambda2"], r["n_exited"]) for r in a.sweep_results]
    assert key == [(r["lambda1"], r["lambda2"], r["n_exited"]) for r in b.sweep_results]
    assert a.method_params["start_exit_counts"] == b.method_params["start_exit_counts"]
    assert [r["n_false_negatives"] for r in a.sweep_results] != [r["n_false_negatives"] for r in b.sweep_results]


def test_inductive_reduces_to_softmax_when_gate_is_constant():
    rng = np.random.default_rng(6)
    _, q, y = GatedGenerator().sample(600, rng)
    r = scrc_inductive(np.full(600, 0.7), q, y, TARGET, DELTA, order="exit_count", n_lambda1=10, n_lambda2=10)
    assert r.method_params["n_lambda1"] == 1
    if r.certified:
        assert r.lambda1 == 0.7 and r.selection_rate == 1.0


def test_inductive_without_enough_positives_exits_nothing_and_says_why():
    rng = np.random.default_rng(7)
    g, q, y = GatedGenerator().sample(120, rng)
    r = scrc_inductive(g, q, y, TARGET, DELTA, n_lambda1=10, n_lambda2=10)
    assert not r.certified and r.lambda1 is None and r.lambda2 is None
    assert r.coverage == 0.0 and not r.calib_exits.any() and r.fnr_bound == 1.0
    needed = positives_needed(TARGET, DELTA / 2, 0)
    assert f"N >= {needed}" in r.reason and "K = 0" in r.reason and "N = " in r.reason
    assert f"{int((y == 1).sum())} positives of 120" in r.reason


def test_inductive_rejects_bad_arguments():
    rng = np.random.default_rng(8)
    g, q, y = GatedGenerator().sample(100, rng)
    with pytest.raises(ValueError, match="order"):
        scrc_inductive(g, q, y, TARGET, DELTA, order="random")
    with pytest.raises(ValueError, match="method"):
        scrc_inductive(g, q, y, TARGET, DELTA, method="holm")
    with pytest.raises(ValueError, match="target_fnr"):
        scrc_inductive(g, q, y, 0.0, DELTA)
    with pytest.raises(ValueError, match="delta"):
        scrc_inductive(g, q, y, TARGET, 1.0)
    with pytest.raises(ValueError, match="entries"):
        scrc_inductive(g[:-1], q, y, TARGET, DELTA)


def naive_choice(g, q, y):
    """Most-exits grid candidate with empirical FNR <= target: no multiplicity correction."""
    l1, l2 = scrc_grid(g, q, 30, 30)
    grid = scrc_candidate_counts(g, q, y, l1, l2)
    ok = (grid.n_exited_positives > 0) & (grid.n_false_negatives <= TARGET * grid.n_exited_positives)
    j = np.flatnonzero(ok)[np.argmax(grid.n_exited[ok])]
    return grid.lambda1[j], grid.lambda2[j]


def test_inductive_validity_simulation():
    gen = GatedGenerator()
    rng = np.random.default_rng(2024)
    draws = 200
    scrc_bad = naive_bad = 0
    coverage = []
    for _ in range(draws):
        g, q, y = gen.sample(600, rng)
        r = scrc_inductive(g, q, y, TARGET, DELTA, n_lambda1=30, n_lambda2=30)
        if r.certified:
            pop = gen.population(r.lambda1, r.lambda2)
            scrc_bad += pop["fnr"] > TARGET
            coverage.append(pop["coverage"])
        naive_bad += gen.population(*naive_choice(g, q, y))["fnr"] > TARGET
    # binomial(200, 0.05) exceeds 20 with probability ~1e-3
    assert scrc_bad / draws <= 0.10, scrc_bad
    assert naive_bad / draws >= 0.25 and naive_bad >= 3 * max(scrc_bad, 1), (naive_bad, scrc_bad)
    assert len(coverage) >= 0.9 * draws and np.mean(coverage) > 0.5


# ----- SCRC-T -------------------------------------------------------------------------------


def test_transductive_thresholds_follow_the_stated_formulas():
    rng = np.random.default_rng(9)
    gen = GatedGenerator()
    g, q, y = gen.sample(700, rng)
    gt, qt, _ = gen.sample(300, rng)
    r = scrc_transductive(g, q, y, gt, qt, TARGET, selection_rate=0.95)
    assert r.certified and r.variant == "SCRC-T" and r.guarantee == "expectation" and r.method == "crc"
    pooled = np.concatenate([g, gt])
    assert np.sum(pooled >= r.lambda1) == 950  # ceil(0.95 * 1000), no ties
    pos = (g >= r.lambda1) & (y == 1)
    n_s = int(pos.sum())

    def adjusted(lam):
        miss = np.mean(~prediction_sets(q[pos], lam)[:, 1])
        return n_s / (n_s + 1) * miss + 1 / (n_s + 1)

    assert r.lambda2 > 0.5  # the CRC constraint binds on this generator
    assert adjusted(r.lambda2) <= TARGET
    assert adjusted(float(np.nextafter(r.lambda2, 0.0))) > TARGET  # the infimum
    assert r.fnr_bound == pytest.approx(adjusted(r.lambda2))
    test_exits, _, _ = scrc_exits(gt, qt, r.lambda1, r.lambda2)
    assert r.test_coverage == pytest.approx(test_exits.mean()) and r.n_test == 300


def test_transductive_uses_half_when_risk_is_already_low():
    rng = np.random.default_rng(10)
    gen = GatedGenerator(hard=0.0)
    g, q, y = gen.sample(600, rng)
    gt, qt, _ = gen.sample(100, rng)
    r = scrc_transductive(g, q, y, gt, qt, 0.09, selection_rate=0.5)
    assert r.method_params["lambda_hat"] < 0.5 and r.lambda2 == 0.5


def test_transductive_refusals():
    rng = np.random.default_rng(11)
    gen = GatedGenerator()
    g, q, y = gen.sample(400, rng)
    gt, qt, _ = gen.sample(MIN_TEST_BATCH - 1, rng)
    with pytest.raises(ValueError, match=f"at least {MIN_TEST_BATCH}"):
        scrc_transductive(g, q, y, gt, qt, TARGET, 0.8)
    with pytest.raises(ValueError, match="selection_rate"):
        scrc_transductive(g, q, y, g[:50], q[:50], TARGET, 0.0)
    r = scrc_transductive(g[:30], q[:30], y[:30], g[:40], q[:40], TARGET, 0.8)  # n_s < 49 positives
    assert not r.certified and r.lambda1 is None and "n_s >= 49" in r.reason and r.coverage == 0.0


def test_transductive_mean_selected_risk_is_controlled():
    gen = GatedGenerator()
    rng = np.random.default_rng(12)
    risks, loose = [], []
    for _ in range(200):
        g, q, y = gen.sample(600, rng)
        gt, qt, _ = gen.sample(100, rng)
        r = scrc_transductive(g, q, y, gt, qt, TARGET, selection_rate=0.95)
        risks.append(gen.population(r.lambda1, r.lambda2)["sel_miss"])
        loose.append(gen.population(r.lambda1, 0.5)["sel_miss"])
    se = np.std(risks, ddof=1) / np.sqrt(len(risks))
    assert np.mean(risks) <= TARGET + 3 * se
    # without stage 2 the same selection misses more than the target: the check above has teeth
    assert np.mean(loose) > TARGET + 10 * np.std(loose, ddof=1) / np.sqrt(len(loose))


# ----- scrcparams.json ----------------------------------------------------------------------


def test_documents_are_schema_valid():
    rng = np.random.default_rng(13)
    gen = GatedGenerator()
    g, q, y = gen.sample(1500, rng)
    gt, qt, _ = gen.sample(200, rng)
    results = [
        scrc_inductive(g, q, y, TARGET, DELTA, n_lambda1=20, n_lambda2=20),
        scrc_inductive(g[:100], q[:100], y[:100], TARGET, DELTA, n_lambda1=10, n_lambda2=10),
        scrc_transductive(g, q, y, gt, qt, TARGET, 0.8),
        scrc_transductive(g[:30], q[:30], y[:30], gt, qt, TARGET, 0.8),
    ]
    assert [r.certified for r in results] == [True, False, True, False]
    trans = {"selection_rate": 0.8, "min_test": MIN_TEST_BATCH, "calibration_file": "scrc_calibration.pt"}
    for r in results:
        extra = {"transductive": trans} if r.variant == "SCRC-T" else {}
        doc = scrcparams_document(r, DIRICHLET, GATE, "ckpt-1", 0.5, r.coverage, metrics={"ece": 0.01}, **extra)
        assert schema_errors(doc, "scrcparams") == []
        json.dumps(doc, allow_nan=False)
        assert doc["set_statistics"]["singleton_rate"] == r.singleton_rate
        assert doc["gate_calibrator"] == GATE and doc["calibrator"] == DIRICHLET
    doc = scrcparams_document(results[0], DIRICHLET, GATE, "ckpt-1", 0.5, 0.8)
    assert schema_errors(dict(doc, extra=1), "scrcparams")
    assert schema_errors(dict(doc, lambda1=None), "scrcparams")  # certified needs thresholds
    assert schema_errors(dict(doc, guarantee="expectation"), "scrcparams")  # SCRC-I is PAC
    assert schema_errors(dict(doc, gate_calibrator={"method": "platt", "a": 1.0}), "scrcparams")
    assert schema_errors(dict(doc, calibrator={"method": "temperature"}), "scrcparams")
    with pytest.raises(ValueError, match="checkpoint_id"):
        scrcparams_document(results[0], DIRICHLET, GATE, "", 0.5, 0.8)
    with pytest.raises(ValueError, match="transductive settings"):
        scrcparams_document(results[2], DIRICHLET, GATE, "c", 0.5, 0.8)
    t_doc = scrcparams_document(results[2], DIRICHLET, GATE, "c", 0.5, 0.8, transductive=trans)
    assert schema_errors({k: v for k, v in t_doc.items() if k != "transductive"}, "scrcparams")
    assert schema_errors(dict(t_doc, transductive=dict(trans, calibration_file="../x.pt")), "scrcparams")
    with pytest.raises(ValueError, match="deploy_prior"):
        scrcparams_document(results[0], DIRICHLET, GATE, "c", 1.5, 0.8)


# ----- special-case families, the choices made on val_select ---------------------------------


def test_special_case_families_equal_the_one_dimensional_certificates():
    from stage1_core.calibration.threshold_sweep import certify_score_threshold

    rng = np.random.default_rng(21)
    g, q, y = GatedGenerator().sample(1500, rng)
    answers = q.argmax(axis=1)
    for order, score in (("gate", g), ("softmax", q.max(axis=1))):
        r = scrc_inductive(g, q, y, TARGET, DELTA, order=order)
        one_d = certify_score_threshold(score, answers, y, TARGET, DELTA)
        # Same exit sets up to float rounding where max q ties a threshold (the set rule compares q_min with
        # 1 - lambda2, the 1-D rule max q with t): at most a couple of samples apart.
        assert r.certified == one_d.certified and abs(r.coverage - one_d.coverage) <= 2 / len(y)
        assert abs(r.n_exited_positives - one_d.n_exited_positives) <= 2 and r.method_params["order"] == order
    gate = scrc_inductive(g, q, y, TARGET, DELTA, order="gate")
    assert gate.lambda2 == 0.5 and {row["lambda2"] for row in gate.sweep_results} == {0.5}
    soft = scrc_inductive(g, q, y, TARGET, DELTA, order="softmax")
    assert soft.lambda1 == g.min() and soft.selection_rate == 1.0


def test_choose_order_keeps_the_family_that_certifies_most_and_prefers_the_special_cases_on_ties():
    from stage1_core.calibration.scrc import CHOICE_ORDERS, choose_order

    rng = np.random.default_rng(22)
    g, q, y = GatedGenerator().sample(1200, rng)
    order, rows = choose_order(g, q, y, TARGET, DELTA, n_lambda1=40, n_lambda2=40)
    assert [r["order"] for r in rows] == list(CHOICE_ORDERS)
    best = max(r["coverage"] for r in rows)
    assert next(r for r in rows if r["order"] == order)["coverage"] == best
    assert order == next(r["order"] for r in rows if r["coverage"] == best)
    assert CHOICE_ORDERS[:2] == ("gate", "softmax"), "full-resolution special cases win ties"
    # Nothing certifies anywhere (too few positives): the first family, the gate's, is kept.
    order, rows = choose_order(g[:60], q[:60], y[:60], TARGET, DELTA, n_lambda1=10, n_lambda2=10)
    assert order == "gate" and not any(r["certified"] for r in rows)


def test_transductive_reference_thresholds_need_no_batch():
    rng = np.random.default_rng(23)
    g, q, y = GatedGenerator().sample(800, rng)
    ref = scrc_transductive(g, q, y, g[:0], q[:0], TARGET, 0.8, min_test=0, delta=DELTA)
    assert ref.certified and ref.n_test is None and ref.test_coverage is None and ref.delta == DELTA
    pooled = np.sort(g)[::-1]
    assert ref.lambda1 == pooled[int(np.ceil(0.8 * 800)) - 1]
    with pytest.raises(ValueError, match="min_test"):
        scrc_transductive(g, q, y, g[:0], q[:0], TARGET, 0.8, min_test=-1)
    with pytest.raises(ValueError, match="at least 1"):
        scrc_transductive(g, q, y, g[:0], q[:0], TARGET, 0.8, min_test=1)


def test_choose_selection_rate_maximises_coverage_on_its_split():
    from stage1_core.calibration.scrc import choose_selection_rate

    rng = np.random.default_rng(24)
    g, q, y = GatedGenerator().sample(900, rng)
    rate, rows = choose_selection_rate(g, q, y, TARGET, rates=(0.25, 0.5, 0.75, 1.0))
    assert [r["selection_rate"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    for r in rows:
        ref = scrc_transductive(g, q, y, g[:0], q[:0], TARGET, r["selection_rate"], min_test=0)
        assert r["coverage"] == ref.coverage and r["feasible"] == ref.certified
    assert next(r for r in rows if r["selection_rate"] == rate)["coverage"] == max(r["coverage"] for r in rows)
    rate, rows = choose_selection_rate(g[:40], q[:40], y[:40], TARGET)  # < 49 positives: nothing feasible
    assert rate == 1.0 and not any(r["feasible"] for r in rows)
    with pytest.raises(ValueError, match="selection rates"):
        choose_selection_rate(g, q, y, TARGET, rates=(0.0, 0.5))
