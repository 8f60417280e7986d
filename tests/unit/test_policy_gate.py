"""Gate exit policy: exit rule, round trips, certification on val_calib and gateparams.json."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import special

from stage1_core.artifacts import ArtifactError, read_json, write_json
from stage1_core.calibration.gate import GateCalibrator
from stage1_core.calibration.threshold_sweep import certify_score_threshold, certify_softmax_threshold
from stage1_core.metrics.exit import coverage_at_prior, exit_metrics
from stage1_core.policies import ExitPolicy, SoftmaxExitPolicy
from stage1_core.policies.gate import GateExitPolicy, fit_gate_policy, gateparams_document

PROBS = np.array([[0.1, 0.9], [0.5, 0.5], [0.85, 0.15], [0.2, 0.8], [0.35, 0.65]])
RAW = np.array([2.0, -1.0, 0.5, 0.0, 1.0])


def _calib_set(n=3000, seed=0, pos_rate=0.7):
    """Class probabilities plus a raw gate logit that is informative about correctness."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < pos_rate).astype(int)
    p1 = np.clip(np.where(y == 1, rng.normal(0.75, 0.2, n), rng.normal(0.3, 0.2, n)), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    correct = probs.argmax(axis=1) == y
    raw = np.where(correct, rng.normal(2.5, 1.0, n), rng.normal(-1.0, 1.0, n))
    return raw, probs, y


def test_exit_rule_uses_the_calibrated_score_and_argmax_labels():
    policy = GateExitPolicy(0.6, GateCalibrator("none"))
    assert isinstance(policy, ExitPolicy) and policy.name == "gate" and policy.policy_file == "gateparams.json"
    d = policy.decide(PROBS, gate_scores=RAW)
    expected = special.expit(RAW) >= 0.6
    np.testing.assert_array_equal(d.exit, expected)
    np.testing.assert_array_equal(d.label, [1, 0, 0, 1, 1])
    assert d.prediction_sets == [(int(lab),) if e else (0, 1) for e, lab in zip(expected, [1, 0, 0, 1, 1])]
    platt = GateCalibrator.from_dict({"method": "platt", "params": {"a": 2.0, "b": -1.0}})
    np.testing.assert_array_equal(
        GateExitPolicy(0.5, platt).exit_mask(PROBS, RAW), special.expit(2.0 * RAW - 1.0) >= 0.5
    )


def test_none_threshold_exits_nothing_and_raw_logits_are_required():
    policy = GateExitPolicy(None, GateCalibrator("none"))
    assert not policy.decide(PROBS, gate_scores=RAW).exit.any()
    with pytest.raises(ValueError, match="raw gate logits"):
        GateExitPolicy(0.5, GateCalibrator("none")).decide(PROBS)
    with pytest.raises(ValueError, match="gate_scores has 3 entries"):
        GateExitPolicy(0.5, GateCalibrator("none")).exit_mask(PROBS, RAW[:3])
    assert len(GateExitPolicy(0.5, GateCalibrator("none")).decide(np.zeros((0, 2)), gate_scores=np.zeros(0))) == 0


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, "0.8", True])
def test_invalid_threshold_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        GateExitPolicy(bad, GateCalibrator("none"))


def test_unfitted_calibrator_refused():
    with pytest.raises(ValueError, match="fitted calibrator"):
        GateExitPolicy(0.5, GateCalibrator("platt"))


@pytest.mark.parametrize("method", ["platt", "isotonic", "none"])
def test_round_trip_dict(method):
    raw, probs, y = _calib_set(n=1500, seed=1)
    cal = GateCalibrator(method).fit(raw, probs.argmax(1) == y)
    policy = GateExitPolicy(0.7, cal)
    data = json.loads(json.dumps(policy.to_dict()))
    back = GateExitPolicy.from_dict(data)
    assert back.to_dict() == policy.to_dict()
    np.testing.assert_array_equal(back.exit_mask(probs, raw), policy.exit_mask(probs, raw))
    with pytest.raises(ValueError, match="gate_threshold"):
        GateExitPolicy.from_dict({k: v for k, v in data.items() if k != "gate_threshold"})


def test_fit_gate_policy_certifies_on_calibrated_scores_and_beats_softmax():
    raw, probs, y = _calib_set()
    cal, res = fit_gate_policy(raw, probs, y, 0.02, 0.05)
    assert cal.method == "platt" and cal.n_fit == len(y) and cal.params["a"] > 0
    assert res.certified and res.fnr_upper_bound <= 0.02
    same = certify_score_threshold(cal.predict(raw), probs.argmax(1), y, 0.02, 0.05)
    assert same.exit_threshold == res.exit_threshold and same.coverage == res.coverage
    # The policy built from the result reproduces the certificate's counts on val_calib.
    policy = GateExitPolicy(res.exit_threshold, cal)
    m = exit_metrics(policy.exit_mask(probs, raw), probs.argmax(1), y)
    assert m.coverage == res.coverage
    assert (m.n_exited_positives, m.n_false_negatives) == (res.n_exited_positives, res.n_false_negatives)
    # Platt is strictly monotone, so it exits the same set as certifying on the raw logits.
    raw_res = certify_score_threshold(raw, probs.argmax(1), y, 0.02, 0.05)
    assert raw_res.coverage == res.coverage
    soft = certify_softmax_threshold(probs, y, 0.02, 0.05)
    assert res.coverage > soft.coverage


def test_isotonic_ties_exit_as_whole_blocks_and_fitting_on_val_calib_warns():
    raw, probs, y = _calib_set(seed=2)
    with pytest.warns(UserWarning, match="isotonic gate calibrator fitted on val_calib"):
        cal, res = fit_gate_policy(raw, probs, y, 0.02, 0.05, calibrator_method="isotonic")
    assert res.certified
    scores = cal.predict(raw)
    exits = GateExitPolicy(res.exit_threshold, cal).exit_mask(probs, raw)
    block = scores == res.exit_threshold
    assert block.sum() > 1 and exits[block].all()  # the whole tie block at the threshold exits
    assert not exits[scores < res.exit_threshold].any()
    # Fitted on a disjoint split (val_select) there is no warning, and val_calib only certifies.
    fit_raw, fit_probs, fit_y = _calib_set(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal2, res2 = fit_gate_policy(
            raw, probs, y, 0.02, 0.05, calibrator_method="isotonic", calibrator_fit_data=(fit_raw, fit_probs, fit_y)
        )
    assert cal2.n_fit == len(fit_y) and cal2.to_dict() != cal.to_dict()
    assert res2.n_calib == len(y)


def test_nothing_certifiable_gives_no_threshold():
    raw, probs, y = _calib_set(n=100, seed=4)
    cal, res = fit_gate_policy(raw, probs, y, 0.02, 0.05)
    assert not res.certified and res.exit_threshold is None and res.reason
    assert not GateExitPolicy(res.exit_threshold, cal).exit_mask(probs, raw).any()


def _document(raw, probs, y, method="platt", deploy_prior=0.5):
    cal, res = fit_gate_policy(raw, probs, y, 0.02, 0.05, calibrator_method=method, calibrator_fit_data=(raw, probs, y))
    soft = certify_softmax_threshold(probs, y, 0.02, 0.05)
    gate_exits = GateExitPolicy(res.exit_threshold, cal).exit_mask(probs, raw)
    soft_exits = SoftmaxExitPolicy(soft.exit_threshold).exit_mask(probs)
    return gateparams_document(
        res, cal, "ckpt-7", deploy_prior,
        coverage_at_prior(gate_exits, y, deploy_prior), soft, coverage_at_prior(soft_exits, y, deploy_prior),
        val_calib_metrics={"gate_auroc_raw": 0.9}, calibrator_fit_split="val_select",
    ), res, soft


@pytest.mark.parametrize("method", ["platt", "isotonic", "none"])
def test_gateparams_document_is_schema_valid_and_loads_as_the_policy(tmp_path, method):
    raw, probs, y = _calib_set(n=800, seed=5)
    doc, res, soft = _document(raw, probs, y, method)
    path = write_json(tmp_path / "gateparams.json", doc, schema="gateparams")
    back = read_json(path, schema="gateparams")
    assert back == json.loads(json.dumps(doc))
    assert back["certified"] and back["gate_threshold"] == res.exit_threshold
    assert back["calibrator_type"] == method and back["calibrator_fit_split"] == "val_select"
    assert back["softmax_comparison"]["coverage"] == soft.coverage
    assert back["coverage_gain_vs_softmax"] == pytest.approx(res.coverage - soft.coverage)
    assert 0 <= back["coverage_at_deploy_prior"] <= 1 and back["deploy_prior"] == 0.5
    assert back["test_level"] == res.test_level and back["n_calib"] == len(y)
    policy = GateExitPolicy.from_file(path)
    np.testing.assert_array_equal(
        policy.exit_mask(probs, raw), GateExitPolicy(res.exit_threshold, GateCalibrator.from_dict(
            {"method": method, "event": "correct", "params": doc["calibrator_params"]})).exit_mask(probs, raw)
    )


def test_uncertified_document_is_schema_valid_and_exits_nothing(tmp_path):
    raw, probs, y = _calib_set(n=100, seed=4)
    doc, res, _ = _document(raw, probs, y)
    assert not doc["certified"] and doc["gate_threshold"] is None and doc["coverage"] == 0
    path = write_json(tmp_path / "gateparams.json", doc, schema="gateparams")
    assert not GateExitPolicy.from_file(path).exit_mask(probs, raw).any()


def test_schema_refuses_inconsistent_documents(tmp_path):
    raw, probs, y = _calib_set(n=800, seed=6)
    doc, _, _ = _document(raw, probs, y)
    doc["sweep_results"] = doc["sweep_results"][:5]  # the rows are not what these cases test
    write_json(tmp_path / "good.json", doc, schema="gateparams")
    bad_cases = [
        {**doc, "gate_threshold": None},  # certified but no threshold
        {**doc, "unexpected": 1},
        {**doc, "calibrator_params": {"a": 1.0}},  # Platt without b
        {**doc, "calibrator_type": "none"},  # params not empty
        {**doc, "softmax_comparison": {"coverage": 0.1}},
        {k: v for k, v in doc.items() if k != "softmax_comparison"},
    ]
    for i, bad in enumerate(bad_cases):
        with pytest.raises(ArtifactError):
            write_json(tmp_path / f"bad{i}.json", bad, schema="gateparams")


def test_document_checks_its_inputs():
    raw, probs, y = _calib_set(seed=7)
    cal, res = fit_gate_policy(raw, probs, y, 0.02, 0.05)
    other = certify_softmax_threshold(probs[:500], y[:500], 0.02, 0.05)
    with pytest.raises(ValueError, match="same val_calib"):
        gateparams_document(res, cal, "ckpt", 0.5, 0.5, other, 0.0)
    with pytest.raises(ValueError, match="checkpoint_id"):
        gateparams_document(res, cal, "", 0.5, 0.5, certify_softmax_threshold(probs, y, 0.02, 0.05), 0.0)


def test_top_k_exits_takes_the_highest_scores_and_breaks_ties_by_the_raw_logit():
    from stage1_core.policies.gate import top_k_exits

    scores = np.array([0.9, 0.5, 0.9, 0.1, 0.5])
    raw = np.array([2.0, 1.0, 3.0, -1.0, 1.5])
    assert top_k_exits(scores, raw, 2).tolist() == [True, False, True, False, False]
    assert top_k_exits(scores, raw, 3).tolist() == [True, False, True, False, True]
    assert top_k_exits(scores, raw, 0).sum() == 0 and top_k_exits(scores, raw, 9).all()
