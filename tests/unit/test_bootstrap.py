import numpy as np
import pytest

from stage1_core.metrics import bootstrap as bs
from stage1_core.metrics.calibration import compute_brier, compute_ece, compute_nll
from stage1_core.metrics.classification import accuracy, balanced_accuracy, mcc
from stage1_core.metrics.exit import coverage_at_prior, exit_metrics
from stage1_core.metrics.selective import selective_metrics


def _data(n=80, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    p1 = rng.uniform(size=n)
    if ties:
        p1 = np.round(p1, 1)  # ties and exact bin edges
    probs = np.stack([1 - p1, p1], axis=1)
    labels = (rng.uniform(size=n) < 0.7).astype(int)
    preds = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    residuals = (preds != labels).astype(float)
    exits = conf >= 0.8
    return probs, labels, preds, conf, residuals, exits


def _statistic(probs, labels, preds, conf, residuals, exits, prior=0.5):
    return bs.combine(
        bs.accuracy_statistic(labels, preds),
        bs.balanced_accuracy_statistic(labels, preds),
        bs.mcc_statistic(labels, preds),
        bs.ece_statistic(probs, labels),
        bs.nll_statistic(probs, labels),
        bs.brier_statistic(probs, labels),
        bs.selective_statistic(conf, residuals),
        bs.coverage_statistic(exits),
        bs.coverage_at_prior_statistic(exits, labels, prior),
        bs.exit_statistic(exits, preds, labels),
    )


def _slow(probs, labels, preds, conf, residuals, exits, prior=0.5):
    """Every metric from the scalar implementations on one resampled data set."""
    out = {
        "accuracy": accuracy(labels, preds),
        "balanced_accuracy": balanced_accuracy(labels, preds),
        "mcc": mcc(labels, preds),
        "ece": compute_ece(probs, labels),
        "nll": compute_nll(probs, labels),
        "brier": compute_brier(probs, labels),
        **selective_metrics(conf, residuals),
    }
    m = exit_metrics(exits, preds, labels)
    out["coverage"] = m.coverage
    out["fnr_on_exited"] = np.nan if m.fnr_on_exited is None else m.fnr_on_exited
    out["exit_accuracy"] = np.nan if m.exit_accuracy is None else m.exit_accuracy
    has_both = 0 < labels.mean() < 1
    out["coverage_at_deploy_prior"] = coverage_at_prior(exits, labels, prior) if has_both else np.nan
    return out


@pytest.mark.parametrize("ties", [True, False])
def test_vectorised_equals_slow_loop_with_same_indices(ties):
    data = _data(ties=ties)
    n = data[0].shape[0]
    indices = bs.resample_indices(n, 300, seed=3)
    vec = _statistic(*data)(bs.counts_from_indices(indices, n))
    slow = [_slow(*(a[i] for a in data)) for i in indices]
    assert set(vec) == set(slow[0])
    for name in vec:
        expected = np.array([s[name] for s in slow])
        np.testing.assert_allclose(vec[name], expected, rtol=1e-12, atol=1e-14, equal_nan=True, err_msg=name)


def test_bootstrap_summary_matches_slow_percentiles():
    data = _data(60, seed=1)
    n = data[0].shape[0]
    indices = bs.resample_indices(n, 400, seed=11)
    results = bs.bootstrap(_statistic(*data), n, indices=indices, chunk_size=37)
    slow = [_slow(*(a[i] for a in data)) for i in indices]
    point = _slow(*data)
    for name, r in results.items():
        values = np.array([s[name] for s in slow])
        defined = values[~np.isnan(values)]
        assert r.n_resamples == 400
        assert r.n_undefined == int(np.isnan(values).sum())
        assert r.value == pytest.approx(point[name], abs=1e-12)
        assert r.mean == pytest.approx(defined.mean(), abs=1e-12)
        assert r.std == pytest.approx(defined.std(ddof=1), abs=1e-12)
        lo, hi = np.percentile(defined, [2.5, 97.5])
        assert (r.ci_lower, r.ci_upper) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_undefined_fnr_resamples_are_counted_and_excluded():
    # one exited positive among 30 samples: many resamples miss it
    labels = np.array([1] + [0] * 29)
    preds = np.zeros(30, int)
    exits = np.zeros(30, bool)
    exits[0] = True
    res = bs.bootstrap(bs.exit_statistic(exits, preds, labels), 30, n_resamples=500, seed=0)
    fnr = res["fnr_on_exited"]
    assert fnr.value == 1.0
    # P(sample 0 never drawn) = (29/30)^30 ~ 0.36
    assert 120 < fnr.n_undefined < 240
    assert fnr.mean == 1.0 and fnr.ci_lower == 1.0 and fnr.ci_upper == 1.0
    none = bs.bootstrap(bs.exit_statistic(np.zeros(30, bool), preds, labels), 30, n_resamples=50)
    assert none["fnr_on_exited"].n_undefined == 50 and np.isnan(none["fnr_on_exited"].mean)


def test_seeded_and_reproducible():
    data = _data()
    stat = bs.accuracy_statistic(data[1], data[2])
    a = bs.bootstrap(stat, 80, n_resamples=200, seed=5)["accuracy"]
    b = bs.bootstrap(stat, 80, n_resamples=200, seed=5)["accuracy"]
    c = bs.bootstrap(stat, 80, n_resamples=200, seed=6)["accuracy"]
    assert a == b
    assert a.ci_lower != c.ci_lower or a.ci_upper != c.ci_upper or a.mean != c.mean
    assert a.ci_lower <= a.value <= a.ci_upper
    assert bs.bootstrap(stat, 80)["accuracy"].n_resamples == 1000  # default
    assert set(a.to_dict()) == {"value", "mean", "std", "ci_lower", "ci_upper", "n_resamples", "n_undefined"}


def test_counts_from_indices():
    idx = bs.resample_indices(7, 5, seed=0)
    counts = bs.counts_from_indices(idx, 7)
    assert counts.shape == (5, 7)
    np.testing.assert_array_equal(counts.sum(axis=1), 7)
    for row, c in zip(idx, counts):
        np.testing.assert_array_equal(np.bincount(row, minlength=7), c)


def test_bad_arguments_raise():
    stat = bs.coverage_statistic(np.ones(5, bool))
    with pytest.raises(ValueError):
        bs.bootstrap(stat, 5, confidence=1.0)
    with pytest.raises(ValueError):
        bs.bootstrap(stat, 5, indices=np.zeros((3, 4), int))
    with pytest.raises(ValueError):
        bs.combine(stat, stat)(np.ones((1, 5)))
