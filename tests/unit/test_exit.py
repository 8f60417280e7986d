import numpy as np
import pytest

from stage1_core.metrics.exit import ExitMetrics, coverage_at_prior, exit_metrics, prior_weights


def test_counts_and_rates():
    labels = np.array([1, 1, 1, 1, 0, 0, 1, 0])
    preds = np.array([1, 0, 1, 0, 0, 1, 1, 0])
    exits = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
    m = exit_metrics(exits, preds, labels)
    assert isinstance(m, ExitMetrics)
    assert (m.n, m.n_exited, m.n_exited_positives, m.n_false_negatives) == (8, 5, 3, 1)
    assert m.coverage == pytest.approx(5 / 8)
    assert m.fnr_on_exited == pytest.approx(1 / 3)
    assert m.exit_accuracy == pytest.approx(3 / 5)  # exited: (1,1) (0,1) (1,1) (0,0) (1,0)
    assert m.to_dict()["n_false_negatives"] == 1


def test_fnr_undefined_without_exited_positive_is_none_not_zero():
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 0, 1, 0])
    m = exit_metrics(np.array([True, True, False, False]), preds, labels)
    assert m.n_exited_positives == 0
    assert m.fnr_on_exited is None
    assert m.exit_accuracy == 1.0
    nothing = exit_metrics(np.zeros(4, bool), preds, labels)
    assert nothing.coverage == 0.0 and nothing.exit_accuracy is None and nothing.fnr_on_exited is None


def test_coverage_at_prior():
    labels = np.array([1] * 9 + [0])  # calibration prior 0.9
    exits = np.array([True] * 3 + [False] * 6 + [True])  # pos coverage 1/3, neg coverage 1
    assert coverage_at_prior(exits, labels, 0.5) == pytest.approx(0.5 * (1 / 3) + 0.5 * 1.0)
    assert coverage_at_prior(exits, labels, 0.9) == pytest.approx(exits.mean())
    w = prior_weights(labels, 0.5)
    assert w[0] == pytest.approx(0.5 / 0.9) and w[-1] == pytest.approx(0.5 / 0.1)
    with pytest.raises(ValueError, match="missing"):
        coverage_at_prior(exits, np.ones(10, int), 0.5)
    with pytest.raises(ValueError):
        coverage_at_prior(exits, labels, 1.5)


def test_bad_input_raises():
    with pytest.raises(ValueError):
        exit_metrics(np.array([True]), np.array([1, 0]), np.array([1, 0]))
    with pytest.raises(ValueError):
        exit_metrics(np.array([2, 0]), np.array([1, 0]), np.array([1, 0]))
