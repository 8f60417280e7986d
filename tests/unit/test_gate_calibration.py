"""Gate calibrators (Platt with smoothed targets, isotonic, none) and gate score metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special
from sklearn.isotonic import IsotonicRegression

from stage1_core.calibration.gate import (
    GateCalibrator,
    gate_auroc,
    gate_calibration_metrics,
    gate_events,
    score_ece,
)


def _logistic_sample(n, a, b, seed, scale=1.5):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, n)
    y = (rng.uniform(size=n) < special.expit(a * z + b)).astype(int)
    return z, y


def test_platt_recovers_known_parameters():
    z, y = _logistic_sample(40000, a=1.7, b=-0.6, seed=0)
    cal = GateCalibrator("platt").fit(z, y)
    assert cal.params["a"] == pytest.approx(1.7, abs=0.06)
    assert cal.params["b"] == pytest.approx(-0.6, abs=0.05)
    np.testing.assert_allclose(cal.predict(z), special.expit(cal.params["a"] * z + cal.params["b"]))


def test_platt_uses_smoothed_targets():
    # Separable data: with hard 0/1 targets the slope would diverge; Platt's targets
    # (N+ + 1)/(N+ + 2) and 1/(N- + 2) keep it finite and put the extremes at those values.
    z = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    cal = GateCalibrator("platt").fit(z, y)
    assert np.isfinite(cal.params["a"]) and cal.params["a"] < 50
    p = cal.predict(z)
    assert p.max() < 1.0 and p.min() > 0.0
    # The optimum sets the mean prediction per side near the smoothed target 4/5 (and 1/5).
    assert p[y == 1].mean() == pytest.approx(4 / 5, abs=0.05)
    assert p[y == 0].mean() == pytest.approx(1 / 5, abs=0.05)


def test_platt_slope_is_never_negative():
    z, y = _logistic_sample(5000, a=-1.0, b=0.0, seed=1)
    cal = GateCalibrator("platt").fit(z, y)
    assert cal.params["a"] == 0.0
    assert np.unique(cal.predict(z)).size == 1


def test_isotonic_is_monotone_and_equals_sklearn():
    z, y = _logistic_sample(3000, a=1.2, b=0.3, seed=2)
    cal = GateCalibrator("isotonic").fit(z, y)
    reference = IsotonicRegression(out_of_bounds="clip", increasing=True, y_min=0.0, y_max=1.0).fit(z, y)
    probe = np.concatenate([z, np.linspace(-10, 10, 501)])
    np.testing.assert_allclose(cal.predict(probe), reference.predict(probe), rtol=0, atol=1e-12)
    grid = np.linspace(-8, 8, 2001)
    assert np.all(np.diff(cal.predict(grid)) >= 0)
    assert np.unique(cal.predict(z)).size < np.unique(z).size  # fitted blocks make ties
    assert isinstance(cal.params["x_thresholds"], list) and isinstance(cal.params["y_thresholds"][0], float)


def test_none_is_the_sigmoid():
    z = np.array([-2.0, 0.0, 3.0])
    cal = GateCalibrator("none")
    assert cal.is_fitted
    np.testing.assert_allclose(cal.predict(z), special.expit(z))


@pytest.mark.parametrize("method", ["platt", "isotonic", "none"])
def test_to_dict_round_trip_is_exact_and_plain_json(method):
    z, y = _logistic_sample(2000, a=0.8, b=0.5, seed=3)
    cal = GateCalibrator(method, event="not_false_negative").fit(z, y)
    data = json.loads(json.dumps(cal.to_dict()))
    back = GateCalibrator.from_dict(data)
    assert back.method == method and back.event == "not_false_negative" and back.n_fit == 2000
    probe = np.linspace(-6, 6, 777)
    np.testing.assert_array_equal(back.predict(probe), cal.predict(probe))


def test_from_dict_rejects_bad_parameters():
    with pytest.raises(ValueError, match="a >= 0"):
        GateCalibrator.from_dict({"method": "platt", "params": {"a": -1.0, "b": 0.0}})
    with pytest.raises(ValueError, match="'a' and 'b'"):
        GateCalibrator.from_dict({"method": "platt", "params": {"a": 1.0}})
    with pytest.raises(ValueError, match="non-decreasing"):
        GateCalibrator.from_dict(
            {"method": "isotonic", "params": {"x_thresholds": [0.0, 1.0], "y_thresholds": [0.9, 0.1]}}
        )
    with pytest.raises(ValueError, match="unknown gate calibrator"):
        GateCalibrator.from_dict({"method": "beta", "params": {}})


def test_unfitted_and_invalid_inputs_are_errors():
    with pytest.raises(ValueError, match="not fitted"):
        GateCalibrator("platt").predict([0.0])
    with pytest.raises(ValueError, match="not fitted"):
        GateCalibrator("isotonic").to_dict()
    with pytest.raises(ValueError, match="binary"):
        GateCalibrator("platt").fit([0.0, 1.0], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        GateCalibrator("platt").fit([0.0, np.nan], [0, 1])
    with pytest.raises(ValueError, match="unknown gate event"):
        GateCalibrator("platt", event="fn")


def test_calibration_lowers_ece_on_a_miscalibrated_gate():
    # The raw gate is overconfident: P(correct | z) = sigmoid(0.4 z + 1.0).
    z, y = _logistic_sample(20000, a=0.4, b=1.0, seed=4, scale=4.0)
    fit, test = slice(0, 10000), slice(10000, None)
    raw_ece = score_ece(special.expit(z[test]), y[test])
    for method in ("platt", "isotonic"):
        cal = GateCalibrator(method).fit(z[fit], y[fit])
        calibrated_ece = score_ece(cal.predict(z[test]), y[test])
        assert calibrated_ece <= raw_ece
        assert calibrated_ece < 0.03 < raw_ece, (method, calibrated_ece, raw_ece)


def test_gate_events():
    pred = np.array([1, 1, 0, 0])
    y = np.array([1, 0, 1, 0])
    np.testing.assert_array_equal(gate_events(pred, y, "correct"), [1, 0, 0, 1])
    np.testing.assert_array_equal(gate_events(pred, y, "not_false_negative"), [1, 1, 0, 1])
    with pytest.raises(ValueError, match="unknown gate event"):
        gate_events(pred, y, "wrong")


def test_gate_auroc_with_ties_and_degenerate_input():
    assert gate_auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert gate_auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert gate_auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    # pairs (pos, neg): (0.9,0.4)=1, (0.9,0.6)=1, (0.4,0.4)=1/2, (0.4,0.6)=0 -> 2.5/4
    assert gate_auroc([0.9, 0.4, 0.4, 0.6], [1, 1, 0, 0]) == pytest.approx(0.625)
    assert gate_auroc([0.3, 0.7], [1, 1]) is None


def test_score_ece_is_compute_ece_on_two_columns():
    s = np.array([0.95, 0.85, 0.3, 0.6])
    e = np.array([1, 0, 0, 1])
    # confidences max(s, 1-s) = .95, .85, .7, .6; correct = [1, 0, 1, 1]; bins (.9,1], (.8,.9], (.6,.7], (.5,.6]
    expected = (abs(1 - 0.95) + abs(0 - 0.85) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert score_ece(s, e) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_ece([1.5], [1])


def test_gate_calibration_metrics_report():
    z, y_event = _logistic_sample(4000, a=1.0, b=0.0, seed=5)
    labels = np.ones(4000, dtype=int)
    pred = np.where(y_event == 1, 1, 0)  # event "correct" equals y_event
    cal = GateCalibrator("isotonic").fit(z, y_event)
    report = gate_calibration_metrics(z, cal, pred, labels)
    assert report["event"] == "correct" and report["n"] == 4000
    assert report["event_rate"] == pytest.approx(y_event.mean())
    assert report["gate_auroc_raw"] == pytest.approx(gate_auroc(z, y_event))
    assert report["gate_auroc_calibrated"] == pytest.approx(gate_auroc(cal.predict(z), y_event))
    assert report["ece_raw_sigmoid"] == pytest.approx(score_ece(special.expit(z), y_event))
    assert report["ece_calibrated"] < 0.02  # in-sample isotonic is nearly perfectly calibrated
