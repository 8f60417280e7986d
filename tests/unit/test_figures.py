import numpy as np
import pytest

from stage1_core.calibration.threshold_sweep import certify_softmax_threshold, thresholds_document
from stage1_core.reporting.figures import plot_reliability, plot_risk_coverage, plot_threshold_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _data(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.85).astype(int)
    p1 = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 2.5, -2.0), 1.5)))
    return np.stack([1 - p1, p1], axis=1), y


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_risk_coverage_png(tmp_path):
    probs, y = _data()
    conf, res = probs.max(axis=1), (probs.argmax(axis=1) != y).astype(float)
    out = plot_risk_coverage(conf, res, tmp_path / "rc" / "risk_coverage.png", n_bootstrap=50,
                             operating_coverage=0.8)
    _check_png(out)


def test_reliability_png(tmp_path):
    probs, y = _data()
    _check_png(plot_reliability(probs, y, tmp_path / "rel" / "reliability.png"))


@pytest.mark.parametrize("n", [1500, 80])
def test_threshold_sweep_png_from_result_and_document(tmp_path, n):
    probs, y = _data(n)
    result = certify_softmax_threshold(probs, y, 0.02, 0.05)
    assert result.certified == (n == 1500)
    _check_png(plot_threshold_sweep(result, 0.02, tmp_path / "a" / "sweep.png"))
    doc = thresholds_document(result, {}, "ckpt", 0.5, result.coverage)
    _check_png(plot_threshold_sweep(doc, 0.02, tmp_path / "b" / "sweep.png"))
    with pytest.raises(TypeError):
        plot_threshold_sweep(42, 0.02, tmp_path / "c.png")


def test_exit_bootstrap_png_and_distribution_matches_the_reported_intervals(tmp_path):
    from stage1_core.metrics import bootstrap as bs
    from stage1_core.reporting.figures import plot_exit_bootstrap

    probs, y = _data()
    exits = probs.max(axis=1) >= 0.9
    stat = bs.combine(bs.coverage_statistic(exits), bs.exit_statistic(exits, probs.argmax(axis=1), y))
    point, distribution = bs.bootstrap_distribution(stat, len(y), n_resamples=300, seed=3)
    summary = bs.bootstrap(stat, len(y), n_resamples=300, seed=3)
    for key in ("coverage", "fnr_on_exited"):
        values = distribution[key][~np.isnan(distribution[key])]
        assert distribution[key].shape == (300,) and point[key] == summary[key].value
        assert np.percentile(values, 2.5) == pytest.approx(summary[key].ci_lower)
        assert np.percentile(values, 97.5) == pytest.approx(summary[key].ci_upper)
    _check_png(plot_exit_bootstrap(distribution, point, tmp_path / "b" / "exit_bootstrap.png", target_fnr=0.02))
