import json

import numpy as np
import pytest
from scipy.optimize import check_grad
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression

from stage1_core.calibration.dirichlet import PROB_FLOOR, DirichletCalibrator


def binary_probs(p1):
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1.0 - p1, p1], axis=1)


def overconfident(n, rng, scale=3.0, pi=0.7):
    """True log-odds z; the model reports sigmoid(scale * z) (overconfident for scale > 1)."""
    y = (rng.uniform(size=n) < pi).astype(np.int64)
    z = rng.normal(np.where(y == 1, 1.0, -1.0), 1.2)
    return binary_probs(expit(scale * z)), y


def nll(q, y):
    return float(-np.mean(np.log(np.clip(q[np.arange(y.shape[0]), y], 1e-300, 1.0))))


def test_unpenalised_binary_equals_logistic_regression_on_log_probs():
    rng = np.random.default_rng(0)
    p, y = overconfident(3000, rng)
    p_new, _ = overconfident(500, rng)
    cal = DirichletCalibrator(reg_lambda=0.0, reg_mu=0.0).fit(p, y)
    feats = np.log(np.clip(p, PROB_FLOOR, 1.0))
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(feats, y)
    assert cal.converged_
    np.testing.assert_allclose(cal.predict_proba(p), lr.predict_proba(feats), atol=1e-6)
    new_feats = np.log(np.clip(p_new, PROB_FLOOR, 1.0))
    np.testing.assert_allclose(cal.predict_proba(p_new), lr.predict_proba(new_feats), atol=1e-6)


def test_identity_is_a_fixed_point_on_exactly_calibrated_data():
    # each p1 value carries exactly the matching fraction of positives: the NLL gradient at
    # W = I, b = 0 vanishes, and ODIR does not penalise the identity
    p1 = np.repeat(np.arange(1, 20) / 20, 40)
    y = np.concatenate([np.r_[np.ones(2 * k), np.zeros(40 - 2 * k)] for k in range(1, 20)]).astype(np.int64)
    cal = DirichletCalibrator(reg_lambda=0.1, reg_mu=0.1).fit(binary_probs(p1), y)
    np.testing.assert_allclose(cal.coef_, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(cal.intercept_, 0.0, atol=1e-6)
    np.testing.assert_allclose(cal.predict_proba(binary_probs(p1)), binary_probs(p1), atol=1e-6)


def test_identity_is_nearly_kept_on_sampled_calibrated_data():
    rng = np.random.default_rng(1)
    p1 = rng.beta(0.7, 0.7, size=20_000)
    y = (rng.uniform(size=p1.shape[0]) < p1).astype(np.int64)
    p = binary_probs(p1)
    cal = DirichletCalibrator(reg_lambda=1e-3, reg_mu=1e-3).fit(p, y)
    assert np.max(np.abs(cal.predict_proba(p) - p)) < 0.05
    # a miscalibrated input moves far from the identity
    far = DirichletCalibrator(reg_lambda=1e-3, reg_mu=1e-3).fit(binary_probs(expit(3 * (p1 - 0.5) * 8)), y)
    assert np.max(np.abs(far.coef_ - np.eye(2))) > 0.2


def test_heldout_nll_improves_on_overconfident_model():
    rng = np.random.default_rng(2)
    p_fit, y_fit = overconfident(2000, rng)
    p_test, y_test = overconfident(5000, rng)
    cal = DirichletCalibrator(reg_lambda=1e-2, reg_mu=1e-2).fit(p_fit, y_fit)
    before, after = nll(p_test, y_test), nll(cal.predict_proba(p_test), y_test)
    assert after < 0.8 * before


def test_initial_state_is_identity_and_gradient_is_exact():
    rng = np.random.default_rng(3)
    p, y = overconfident(200, rng)
    cal = DirichletCalibrator(reg_lambda=0.7, reg_mu=0.3)
    feats = np.log(np.clip(p, PROB_FLOOR, 1.0))
    onehot = np.eye(2)[y]
    theta = rng.normal(size=6)
    err = check_grad(lambda t: cal._objective(t, feats, onehot)[0], lambda t: cal._objective(t, feats, onehot)[1], theta)
    assert err < 1e-5
    identity = np.concatenate([np.eye(2).ravel(), np.zeros(2)])
    # at W = I, b = 0 the loss is the raw NLL: no penalty on the diagonal
    assert cal._objective(identity, feats, onehot)[0] == pytest.approx(nll(p, y), rel=1e-9)


@pytest.mark.parametrize("normalise, lam_w, mu_w", [(True, 0.7 / 2, 0.3 / 2), (False, 0.7, 0.3)])
def test_odir_penalty_and_normalisation(normalise, lam_w, mu_w):
    rng = np.random.default_rng(4)
    p, y = overconfident(100, rng)
    cal = DirichletCalibrator(reg_lambda=0.7, reg_mu=0.3, normalise=normalise)
    feats = np.log(np.clip(p, PROB_FLOOR, 1.0))
    onehot = np.eye(2)[y]
    w = np.array([[2.0, 0.5], [-1.5, 3.0]])
    b = np.array([0.4, -0.2])
    theta = np.concatenate([w.ravel(), b])
    q = softmax(feats @ w.T + b, axis=1)
    expected = nll(q, y) + lam_w * (0.5**2 + 1.5**2) + mu_w * (0.4**2 + 0.2**2)
    assert cal._objective(theta, feats, onehot)[0] == pytest.approx(expected, rel=1e-10)


def test_strong_odir_shrinks_off_diagonal_and_bias():
    rng = np.random.default_rng(5)
    p, y = overconfident(2000, rng, pi=0.85)
    free = DirichletCalibrator(reg_lambda=0.0, reg_mu=0.0).fit(p, y)
    tight = DirichletCalibrator(reg_lambda=1e3, reg_mu=1e3).fit(p, y)
    off = ~np.eye(2, dtype=bool)
    assert np.abs(tight.coef_[off]).max() < 1e-2 < np.abs(free.coef_[off]).max()
    assert np.abs(tight.intercept_).max() < 1e-2 < np.abs(free.intercept_).max()


def test_three_classes_and_zero_probabilities():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, size=900)
    logits = rng.normal(size=(900, 3)) + 2.5 * np.eye(3)[y]
    p = softmax(3 * logits, axis=1)
    p[:5] = np.eye(3)[y[:5]]  # exact zeros are clipped before the log
    cal = DirichletCalibrator(reg_lambda=1e-2, reg_mu=1e-2).fit(p, y)
    q = cal.predict_proba(p)
    assert q.shape == (900, 3) and np.all(np.isfinite(q))
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    assert nll(q, y) < nll(np.clip(p, 1e-12, 1), y)
    assert (cal.predict(p) == q.argmax(axis=1)).all()


def test_to_dict_is_plain_json_and_round_trips():
    rng = np.random.default_rng(7)
    p, y = overconfident(500, rng)
    cal = DirichletCalibrator(reg_lambda=0.1, reg_mu=0.05, max_iter=50).fit(p, y)
    data = json.loads(json.dumps(cal.to_dict()))
    assert data["method"] == "dirichlet" and data["n_classes"] == 2
    assert isinstance(data["W"][0][0], float) and isinstance(data["b"][0], float)
    back = DirichletCalibrator.from_dict(data)
    np.testing.assert_array_equal(back.predict_proba(p), cal.predict_proba(p))
    assert (back.reg_lambda, back.reg_mu, back.max_iter, back.normalise) == (0.1, 0.05, 50, True)


def test_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        DirichletCalibrator().predict_proba(binary_probs([0.3]))
    with pytest.raises(ValueError, match=">= 0"):
        DirichletCalibrator(reg_lambda=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        DirichletCalibrator(max_iter=0)
    with pytest.raises(ValueError, match="sum to 1"):
        DirichletCalibrator().fit(np.array([[0.2, 0.2], [0.5, 0.5]]), [0, 1])
    with pytest.raises(ValueError, match="integers"):
        DirichletCalibrator().fit(binary_probs([0.2, 0.7]), [0, 2])
    cal = DirichletCalibrator().fit(binary_probs([0.2, 0.7, 0.9, 0.4]), [0, 1, 1, 0])
    with pytest.raises(ValueError, match="classes"):
        cal.predict_proba(np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="not a Dirichlet"):
        DirichletCalibrator.from_dict({"method": "platt"})
    with pytest.raises(ValueError, match="W"):
        DirichletCalibrator.from_dict({"method": "dirichlet", "W": [[1.0, 0.0]], "b": [0.0, 0.0]})
    with pytest.raises(ValueError, match="finite"):
        DirichletCalibrator.from_dict({"method": "dirichlet", "W": [[1.0, float("nan")], [0, 1]], "b": [0.0, 0.0]})
