import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef

from stage1_core.metrics.classification import accuracy, balanced_accuracy, mcc


def test_against_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=300) < 0.8).astype(int)
    p = np.where(rng.uniform(size=300) < 0.85, y, 1 - y)
    assert accuracy(y, p) == pytest.approx(np.mean(y == p))
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))
    assert mcc(y, p) == pytest.approx(matthews_corrcoef(y, p))


def test_known_values():
    y = np.array([1, 1, 1, 0])
    p = np.array([1, 1, 0, 0])
    assert accuracy(y, p) == 0.75
    assert balanced_accuracy(y, p) == pytest.approx((2 / 3 + 1) / 2)
    assert mcc(y, p) == pytest.approx((2 * 1 - 0 * 1) / np.sqrt(2 * 3 * 1 * 2))


def test_degenerate_inputs_are_defined():
    ones = np.ones(5, int)
    assert balanced_accuracy(ones, np.array([1, 1, 0, 1, 1])) == pytest.approx(0.8)  # only class 1 present
    assert mcc(ones, ones) == 0.0  # constant labels and predictions
    assert mcc(np.array([0, 1, 0, 1]), np.ones(4, int)) == 0.0


def test_bad_input_raises():
    with pytest.raises(ValueError):
        accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError):
        mcc(np.array([], int), np.array([], int))
