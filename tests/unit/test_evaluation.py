import numpy as np
import pandas as pd
import pytest

from stage1_core.calibration.bounds import fnr_upper_bound
from stage1_core.evaluation import METRIC_ORDER, TABLE_COLUMNS, evaluate_decisions
from stage1_core.metrics.calibration import compute_brier, compute_ece, compute_nll
from stage1_core.metrics.classification import accuracy, balanced_accuracy, mcc
from stage1_core.metrics.exit import coverage_at_prior, exit_metrics
from stage1_core.metrics.selective import selective_metrics
from stage1_core.policies import SoftmaxExitPolicy

REQUIRED_ROWS = [
    "accuracy", "balanced_accuracy", "mcc", "ece", "nll", "brier", "augrc", "coverage",
    "coverage_at_deploy_prior", "fnr_on_exited", "fnr_on_exited_cp_upper", "exit_accuracy",
    "risk@0.5", "risk@0.6", "risk@0.7", "risk@0.8", "risk@0.9",
    "coverage@0.01", "coverage@0.02", "coverage@0.05", "coverage@0.1",
]


def _data(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.85).astype(int)
    z = rng.normal(np.where(y == 1, 2.5, -2.0), 1.5)
    p1 = 1 / (1 + np.exp(-z))
    return np.stack([1 - p1, p1], axis=1), y


def _evaluate(probs, y, policy, **kw):
    kw = {"deploy_prior": 0.5, "target_fnr": 0.02, "delta": 0.05, "n_bootstrap": 200, "seed": 1, **kw}
    return evaluate_decisions(probs, y, policy.decide(probs), **kw)


def test_table_columns_rows_and_values():
    probs, y = _data()
    report = _evaluate(probs, y, SoftmaxExitPolicy(0.7))
    t = report.table
    assert list(t.columns) == list(TABLE_COLUMNS) == ["metric", "value", "mean", "std", "ci_lower", "ci_upper", "n"]
    assert list(t["metric"]) == list(METRIC_ORDER)
    assert set(REQUIRED_ROWS) <= set(t["metric"])
    preds, conf = probs.argmax(axis=1), probs.max(axis=1)
    exits = conf >= 0.7
    em = exit_metrics(exits, preds, y)
    expected = {
        "accuracy": accuracy(y, preds),
        "balanced_accuracy": balanced_accuracy(y, preds),
        "mcc": mcc(y, preds),
        "ece": compute_ece(probs, y),
        "nll": compute_nll(probs, y),
        "brier": compute_brier(probs, y),
        "coverage": exits.mean(),
        "coverage_at_deploy_prior": coverage_at_prior(exits, y, 0.5),
        "fnr_on_exited": em.fnr_on_exited,
        "fnr_on_exited_cp_upper": fnr_upper_bound(em.n_false_negatives, em.n_exited_positives, 0.05),
        "exit_accuracy": em.exit_accuracy,
        **selective_metrics(conf, (preds != y).astype(float)),
    }
    for metric, value in expected.items():
        assert report.row(metric)["value"] == pytest.approx(value, abs=1e-12), metric
    for metric in ("accuracy", "fnr_on_exited", "augrc", "risk@0.9"):
        row = report.row(metric)
        assert row["ci_lower"] <= row["value"] <= row["ci_upper"]
        assert row["std"] > 0
    assert report.row("fnr_on_exited")["n"] == em.n_exited_positives
    assert report.row("exit_accuracy")["n"] == em.n_exited
    assert report.row("accuracy")["n"] == len(y)
    assert np.isnan(report.row("fnr_on_exited_cp_upper")["ci_lower"])
    h = report.headline
    assert h["fnr_on_exited_cp_upper"] == expected["fnr_on_exited_cp_upper"]
    assert h["target_fnr_exit_met"] == (expected["fnr_on_exited_cp_upper"] <= 0.02)
    assert h["n_exited_positives"] == em.n_exited_positives and h["n_test"] == len(y)


def test_exit_nothing_reports_undefined_fnr():
    probs, y = _data(400)
    report = _evaluate(probs, y, SoftmaxExitPolicy(None))
    assert report.row("coverage")["value"] == 0.0
    assert np.isnan(report.row("fnr_on_exited")["value"])
    assert report.row("fnr_on_exited_undefined_resamples")["value"] == 200
    assert report.row("fnr_on_exited_cp_upper")["value"] == 1.0
    assert report.headline["fnr_on_exited"] is None and report.headline["target_fnr_exit_met"] is False


def test_to_csv_round_trip(tmp_path):
    probs, y = _data(500)
    report = _evaluate(probs, y, SoftmaxExitPolicy(0.8))
    path = report.to_csv(tmp_path / "eval" / "metrics.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(TABLE_COLUMNS)
    pd.testing.assert_frame_equal(back, report.table, check_dtype=False)
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]


def test_seeded_and_uses_given_decisions():
    probs, y = _data(500)
    a = _evaluate(probs, y, SoftmaxExitPolicy(0.8))
    b = _evaluate(probs, y, SoftmaxExitPolicy(0.8))
    pd.testing.assert_frame_equal(a.table, b.table)
    # evaluation reports the decisions it is given, whatever made them
    decisions = SoftmaxExitPolicy(0.95).decide(probs)
    r = evaluate_decisions(probs, y, decisions, deploy_prior=0.5, target_fnr=0.02, delta=0.05, n_bootstrap=50)
    assert r.row("coverage")["value"] == pytest.approx(decisions.exit.mean())


def test_bad_input_raises():
    probs, y = _data(100)
    decisions = SoftmaxExitPolicy(0.8).decide(probs[:50])
    with pytest.raises(ValueError, match="decisions cover 50"):
        evaluate_decisions(probs, y, decisions, deploy_prior=0.5, target_fnr=0.02, delta=0.05)


def test_every_policy_reports_set_size_rejection_rate_and_classwise_ece():
    from stage1_core.metrics.calibration import classwise_ece
    from stage1_core.policies.base import Decisions

    probs, y = _data(600)
    decisions = SoftmaxExitPolicy(0.8).decide(probs)
    exits = np.asarray(decisions.exit, dtype=bool)
    report = evaluate_decisions(probs, y, decisions, deploy_prior=0.5, target_fnr=0.02, delta=0.05, n_bootstrap=200)
    assert 0 < exits.mean() < 1
    assert report.row("rejection_rate")["value"] == pytest.approx(1 - exits.mean(), abs=1e-12)
    assert report.row("average_set_size")["value"] == pytest.approx(1 + (1 - exits.mean()), abs=1e-12)
    assert report.row("classwise_ece")["value"] == pytest.approx(classwise_ece(probs, y), abs=1e-12)
    for metric in ("rejection_rate", "average_set_size", "classwise_ece"):
        row = report.row(metric)
        assert row["ci_lower"] <= row["value"] <= row["ci_upper"] and row["std"] > 0, metric
        assert report.headline[metric] == row["value"]
    # SCRC-style sets: the set sizes are read from the decisions, not derived from exit.
    sets = [(1,) if i % 3 == 0 else (0, 1) if i % 3 == 1 else (0,) for i in range(len(y))]
    scrc = Decisions(exits, decisions.label, decisions.p_roadwork, sets)
    other = evaluate_decisions(probs, y, scrc, deploy_prior=0.5, target_fnr=0.02, delta=0.05, n_bootstrap=200)
    assert other.row("average_set_size")["value"] == pytest.approx(np.mean([len(s) for s in sets]), abs=1e-12)
