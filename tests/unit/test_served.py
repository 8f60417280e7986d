"""The served probability: a logistic map of the head's margin, at the deployment prior."""

from __future__ import annotations

import numpy as np
import pytest

from stage1_core.calibration.served import fit_served_calibrator, logit_margin, served_probability


def _scores(n1: int, n0: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([1] * n1 + [0] * n0)
    margin = np.where(labels == 1, 1.0, -1.0) * 1.5 + rng.normal(0, 1.0, len(labels)) + 2.0  # head biased to 1
    p1 = 1 / (1 + np.exp(-margin))
    return np.stack([1 - p1, p1], 1), labels


def test_calibrated_at_the_deployment_prior():
    probs, labels = _scores(4000, 800)
    spec = fit_served_calibrator(probs, labels, prior=0.5)
    p = served_probability(spec, probs)
    # at prior 0.5 the served mean of each class balances: reweighted mean of p equals 0.5
    weighted = 0.5 * p[labels == 1].mean() + 0.5 * p[labels == 0].mean()
    assert weighted == pytest.approx(0.5, abs=0.02)
    # balanced accuracy of round(p) beats the raw head's biased cut
    raw = (probs[:, 1] > 0.5).astype(int)
    served = np.round(p).astype(int)
    bal = lambda a: 0.5 * (a[labels == 1] == 1).mean() + 0.5 * (a[labels == 0] == 0).mean()  # noqa: E731
    assert bal(served) > bal(raw)
    # strictly increasing: never reorders images
    order = np.argsort(logit_margin(probs))
    assert np.all(np.diff(p[order]) >= 0)
    assert spec["fit_split"] == "val_select" and spec["a"] > 0


def test_refuses_val_calib_and_one_class():
    probs, labels = _scores(100, 20)
    with pytest.raises(ValueError, match="val_calib"):
        fit_served_calibrator(probs, labels, fit_split="val_calib")
    with pytest.raises(ValueError, match="both classes"):
        fit_served_calibrator(probs[:100], labels[:100])
    with pytest.raises(ValueError, match="unknown"):
        served_probability({"method": "other"}, probs)


def test_predictor_serves_the_calibrated_probability_for_every_image():
    import torch

    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.policies import SoftmaxExitPolicy

    head = torch.nn.Linear(4, 2)
    features = torch.randn(50, 4)
    plain = Stage1Predictor(head, SoftmaxExitPolicy(0.9))
    probs, labels = _scores(300, 100)
    spec = fit_served_calibrator(probs, labels)
    served = Stage1Predictor(head, SoftmaxExitPolicy(0.9), served=spec)
    a, b = plain.decide_features(features), served.decide_features(features)
    np.testing.assert_array_equal(a.exit, b.exit)
    np.testing.assert_array_equal(a.label, b.label)
    expected = served_probability(spec, plain.predict_proba_from_features(features))
    np.testing.assert_allclose(b.p_roadwork, expected)
    assert not np.allclose(a.p_roadwork, b.p_roadwork)
