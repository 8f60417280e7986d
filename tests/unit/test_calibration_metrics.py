import numpy as np
import pytest

from stage1_core.metrics.calibration import classwise_ece, compute_brier, compute_ece, compute_nll


def _probs(n, seed=0, classes=2, round_to=None):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes) * 0.7, size=n)
    if round_to is not None:  # put many confidences exactly on bin edges
        p1 = np.round(p[:, 1], round_to)
        p = np.stack([1 - p1, p1], axis=1)
    y = rng.integers(0, classes, size=n)
    return p, y


def _ece_direct(probs, labels, n_bins=10):
    """The baseline's loop: (lo, hi] bins, weight = bin size / n."""
    conf = probs.max(axis=1)
    acc = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        prop = in_bin.mean()
        if prop > 0:
            ece += abs(conf[in_bin].mean() - acc[in_bin].mean()) * prop
    return ece


@pytest.mark.parametrize(("seed", "round_to"), [(0, None), (1, 1), (2, 2), (3, None)])
def test_ece_matches_direct_recomputation(seed, round_to):
    p, y = _probs(500, seed, round_to=round_to)
    assert compute_ece(p, y) == pytest.approx(_ece_direct(p, y), abs=1e-12)
    assert compute_ece(p, y, n_bins=15) == pytest.approx(_ece_direct(p, y, 15), abs=1e-12)


def test_ece_multiclass_and_known_values():
    p, y = _probs(300, 5, classes=3)
    assert compute_ece(p, y) == pytest.approx(_ece_direct(p, y), abs=1e-12)
    # 80% confident and 80% right: calibrated.
    probs = np.tile([0.2, 0.8], (10, 1))
    labels = np.array([1] * 8 + [0] * 2)
    assert compute_ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # 90% confident, always right: ECE 0.1.
    assert compute_ece(np.tile([0.1, 0.9], (4, 1)), np.ones(4, int)) == pytest.approx(0.1)


def test_nll_and_brier_known_values():
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    labels = np.array([1, 1])
    assert compute_nll(probs, labels) == pytest.approx(-(np.log(0.8) + np.log(0.4)) / 2)
    # mean over all 4 entries of (p - onehot)^2
    assert compute_brier(probs, labels) == pytest.approx((0.04 + 0.04 + 0.36 + 0.36) / 4)
    assert np.isfinite(compute_nll(np.array([[1.0, 0.0]]), np.array([1])))


def test_classwise_ece_matches_direct():
    p, y = _probs(400, 7, classes=3)
    edges = np.linspace(0, 1, 11)
    per_class = []
    for k in range(3):
        pk, hit = p[:, k], (y == k).astype(float)
        total = 0.0
        for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            in_bin = ((pk > lo) | (i == 0)) & (pk <= hi)
            if in_bin.any():
                total += in_bin.mean() * abs(hit[in_bin].mean() - pk[in_bin].mean())
        per_class.append(total)
    assert classwise_ece(p, y) == pytest.approx(np.mean(per_class), abs=1e-12)


@pytest.mark.parametrize(
    ("probs", "labels"),
    [
        (np.array([[2.0, -1.0]]), np.array([0])),  # logits, not probabilities
        (np.array([[0.5, 0.5]]), np.array([2])),  # label out of range
        (np.array([0.5, 0.5]), np.array([0])),  # 1-D
        (np.array([[0.5, 0.5], [0.3, 0.7]]), np.array([0])),  # length mismatch
        (np.array([[np.nan, 1.0]]), np.array([0])),
    ],
)
def test_bad_input_raises(probs, labels):
    for fn in (compute_ece, compute_nll, compute_brier, classwise_ece):
        with pytest.raises(ValueError):
            fn(probs, labels)
