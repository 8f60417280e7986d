import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stage1_core.metrics.selective import (
    aurc,
    augrc,
    coverage_at_risk,
    risk_at_coverage,
    risk_coverage_curve,
    selective_metrics,
)

RESIDUALS = [0, 1, 0, 0, 1]


def _fdshifts_augrc(confids, residuals):
    """Transcription of fd-shifts' generalized_risk_stats + linear AUC, divided by 1000."""
    confids, residuals = np.asarray(confids, float), np.asarray(residuals, float)
    n = len(residuals)
    idx = np.argsort(confids)
    residuals, confidence = residuals[idx], confids[idx]
    cov, error_sum = n, residuals.sum()
    coverages, risks = [1.0], [error_sum / n]
    for i in range(n - 1):
        cov -= 1
        error_sum -= residuals[i]
        if confidence[i] != confidence[i + 1]:
            coverages.append(cov / n)
            risks.append(error_sum / n)
    coverages.append(0)
    risks.append(0)
    return -np.trapezoid(risks, coverages) * 1000 / 1000


def test_augrc_reference_values():
    assert augrc([0.9, 0.8, 0.7, 0.6, 0.5], RESIDUALS) == pytest.approx(0.160)
    assert augrc([0.9, 0.9, 0.7, 0.7, 0.5], RESIDUALS) == pytest.approx(0.180)


def test_augrc_all_tied_and_perfect():
    res = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    err = res.mean()
    assert augrc(np.full(8, 0.7), res) == pytest.approx(err / 2)
    perfect = 1.0 - res * 0.5 - np.arange(8) * 1e-3  # every correct sample above every error
    assert augrc(perfect, res) == pytest.approx(err**2 / 2)


@pytest.mark.parametrize("seed", range(4))
def test_augrc_closed_form_and_fdshifts(seed):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.uniform(0.5, 1.0, size=300), 2)  # many ties
    res = (rng.uniform(size=300) < 1.2 - conf).astype(float)
    acc = 1 - res.mean()
    auroc = roc_auc_score(1 - res, conf)  # ties count 1/2
    closed = (1 - auroc) * acc * (1 - acc) + (1 - acc) ** 2 / 2
    value = augrc(conf, res)
    assert value == pytest.approx(closed, abs=1e-12)
    assert value == pytest.approx(_fdshifts_augrc(conf, res), abs=1e-12)
    assert 0.0 <= value <= 1.0


def test_curve_ties_leave_together():
    curve = risk_coverage_curve([0.9, 0.9, 0.7, 0.7, 0.5], RESIDUALS)
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.7, 0.5])
    np.testing.assert_allclose(curve.coverages, [0.4, 0.8, 1.0])
    np.testing.assert_allclose(curve.selective_risks, [0.5, 0.25, 0.4])
    np.testing.assert_allclose(curve.generalized_risks, [0.2, 0.2, 0.4])


def test_risk_at_coverage_and_coverage_at_risk():
    conf = [0.9, 0.8, 0.7, 0.6, 0.5]
    # curve: coverage .2 .4 .6 .8 1, selective risk 0 .5 1/3 .25 .4
    assert risk_at_coverage(conf, RESIDUALS, 0.2) == 0.0
    assert risk_at_coverage(conf, RESIDUALS, 0.5) == pytest.approx(1 / 3)
    assert risk_at_coverage(conf, RESIDUALS, 1.0) == pytest.approx(0.4)
    assert coverage_at_risk(conf, RESIDUALS, 0.0) == pytest.approx(0.2)
    assert coverage_at_risk(conf, RESIDUALS, 0.3) == pytest.approx(0.8)
    assert coverage_at_risk([0.9, 0.8], [1, 1], 0.1) == 0.0
    # 7 of 10 accepted is coverage 0.7 although 0.7 * 10 > 7 in floating point
    conf10 = np.linspace(1.0, 0.55, 10)
    res10 = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert risk_at_coverage(conf10, res10, 0.7) == 0.0


def test_aurc_reference():
    # trapezoid over (0, 0), (.2, 0), (.4, .5), (.6, 1/3), (.8, .25), (1, .4)
    expected = 0.2 * (0 + 0.5) / 2 + 0.2 * (0.5 + 1 / 3) / 2 + 0.2 * (1 / 3 + 0.25) / 2 + 0.2 * (0.25 + 0.4) / 2
    assert aurc([0.9, 0.8, 0.7, 0.6, 0.5], RESIDUALS) == pytest.approx(expected)


def test_selective_metrics_keys_and_consistency():
    rng = np.random.default_rng(3)
    conf = rng.uniform(size=200)
    res = (rng.uniform(size=200) < 0.2).astype(float)
    out = selective_metrics(conf, res)
    assert list(out) == [
        "augrc", "aurc", "risk@0.5", "risk@0.6", "risk@0.7", "risk@0.8", "risk@0.9",
        "coverage@0.01", "coverage@0.02", "coverage@0.05", "coverage@0.1",
    ]
    assert out["augrc"] == augrc(conf, res)
    assert out["risk@0.7"] == risk_at_coverage(conf, res, 0.7)
    assert out["coverage@0.05"] == coverage_at_risk(conf, res, 0.05)
    assert all(isinstance(v, float) for v in out.values())


def test_bad_input_raises():
    with pytest.raises(ValueError):
        augrc([0.5, 0.6], [0, 1, 1])
    with pytest.raises(ValueError):
        augrc([0.5, 0.6], [0, 2])
    with pytest.raises(ValueError):
        augrc([], [])
    with pytest.raises(ValueError):
        risk_at_coverage([0.5], [0], 1.5)
