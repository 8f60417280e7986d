import numpy as np
import pytest
from scipy.special import expit

from stage1_core.artifacts import ArtifactError, read_json, schema_errors, write_json
from stage1_core.calibration.dirichlet import DirichletCalibrator
from stage1_core.calibration.scrc import prediction_sets, scrc_exits, scrc_inductive, scrcparams_document
from stage1_core.policies.base import DEFERRED_SET, Decisions, ExitPolicy
from stage1_core.policies.scrc import SCRCDecisions, SCRCExitPolicy, apply_gate_calibration, check_gate_calibrator

PLATT = {"method": "platt", "a": 1.5, "b": -0.5}


def binary(p1):
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1.0 - p1, p1], axis=1)


def raw_outputs(n, rng):
    """Overconfident softmax outputs p, raw gate logits z and labels (90% roadwork)."""
    y = (rng.uniform(size=n) < 0.9).astype(np.int64)
    hard = (y == 1) & (rng.uniform(size=n) < 0.05)
    s = np.where((y == 1) & ~hard, rng.normal(2.5, 1.5, n), rng.normal(-2.0, 1.5, n))
    p = binary(expit(3.0 * s))
    z = 0.5 * np.abs(s) + np.where(hard, -2.0, 0.5) + rng.normal(size=n)
    return p, z, y


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    p_fit, z_fit, y_fit = raw_outputs(4000, rng)  # calibrators are fit off val_calib
    cal = DirichletCalibrator(reg_lambda=1e-2, reg_mu=1e-2).fit(p_fit, y_fit)
    p, z, y = raw_outputs(1500, rng)  # val_calib
    policy0 = SCRCExitPolicy(None, None, cal.to_dict(), PLATT)
    q, g = policy0.calibrated(p, z)
    result = scrc_inductive(g, q, y, 0.02, 0.05, n_lambda1=40, n_lambda2=40)
    assert result.certified
    return cal, result, (p, z, y)


def test_class_attributes_and_interface():
    assert issubclass(SCRCExitPolicy, ExitPolicy)
    assert (SCRCExitPolicy.name, SCRCExitPolicy.policy_file, SCRCExitPolicy.schema) == (
        "scrc",
        "scrcparams.json",
        "scrcparams",
    )


def test_gate_calibration_methods():
    z = np.array([-3.0, -0.5, 0.0, 0.7, 4.0])
    np.testing.assert_allclose(apply_gate_calibration(z, PLATT), expit(1.5 * z - 0.5))
    np.testing.assert_allclose(apply_gate_calibration(z, {"method": "none"}), expit(z))
    iso = {"method": "isotonic", "x": [-1.0, 0.0, 1.0], "y": [0.1, 0.5, 0.9]}
    np.testing.assert_allclose(apply_gate_calibration(z, iso), [0.1, 0.3, 0.5, 0.78, 0.9])
    iso_p = dict(iso, x=[0.2, 0.5, 0.8], input="sigmoid")
    np.testing.assert_allclose(apply_gate_calibration(z, iso_p), np.interp(expit(z), [0.2, 0.5, 0.8], [0.1, 0.5, 0.9]))


@pytest.mark.parametrize("method", ["platt", "isotonic", "none"])
def test_gate_calibrator_dicts_from_calibration_gate_are_accepted(method, fitted):
    from stage1_core.calibration.gate import GateCalibrator

    rng = np.random.default_rng(4)
    z = rng.normal(size=400)
    event = (rng.uniform(size=400) < expit(2 * z)).astype(int)
    gate_cal = GateCalibrator(method).fit(z, event)
    spec = gate_cal.to_dict()
    z_new = rng.normal(scale=2.0, size=200)
    np.testing.assert_allclose(apply_gate_calibration(z_new, spec), gate_cal.predict(z_new))
    flat = check_gate_calibrator(spec)
    assert "params" not in flat and flat["event"] == "correct" and flat["n_fit"] == 400
    np.testing.assert_allclose(apply_gate_calibration(z_new, flat), gate_cal.predict(z_new))
    cal, result, _ = fitted
    doc = scrcparams_document(result, cal.to_dict(), spec, "ckpt", 0.5, result.coverage)
    assert doc["gate_calibrator"] == flat
    assert schema_errors(doc, "scrcparams") == []


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"method": "temperature"}, "unknown gate calibration"),
        ({"method": "platt", "a": 1.0}, "platt b"),
        ({"method": "platt", "a": float("inf"), "b": 0.0}, "finite"),
        ({"method": "isotonic", "x": [0.0, 1.0], "y": [0.5]}, "equal"),
        ({"method": "isotonic", "x": [1.0, 0.0], "y": [0.2, 0.5]}, "non-decreasing"),
        ({"method": "isotonic", "x": [0.0, 1.0], "y": [0.2, 1.5]}, r"\[0, 1\]"),
        ({"method": "isotonic", "x": [0.0], "y": [0.2], "input": "probit"}, "input"),
        ({"method": "platt", "params": {"a": 1.0}}, "platt b"),
        ({"method": "none", "n_fit": -1}, "n_fit"),
        ("platt", "dict"),
    ],
)
def test_gate_calibration_rejects_bad_specs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_gate_calibrator(spec)


def test_round_trip_to_dict_from_dict(fitted):
    cal, result, (p, z, _) = fitted
    policy = SCRCExitPolicy(result.lambda1, result.lambda2, cal.to_dict(), PLATT)
    data = policy.to_dict()
    assert data["policy"] == "scrc" and data["lambda1"] == result.lambda1
    back = SCRCExitPolicy.from_dict(data)
    assert back.to_dict() == data
    np.testing.assert_array_equal(back.exit_mask(p, z), policy.exit_mask(p, z))


def test_exit_mask_applies_both_calibrations(fitted):
    cal, result, (p, z, _) = fitted
    policy = SCRCExitPolicy(result.lambda1, result.lambda2, cal.to_dict(), PLATT)
    q = cal.predict_proba(p)
    g = expit(PLATT["a"] * z + PLATT["b"])
    expected = (g >= result.lambda1) & (prediction_sets(q, result.lambda2).sum(axis=1) == 1)
    np.testing.assert_array_equal(policy.exit_mask(p, z), expected)
    # the same thresholds on raw p (no Dirichlet) exit a different set: the calibrator is used
    raw = SCRCExitPolicy(result.lambda1, result.lambda2, {"method": "none"}, PLATT)
    assert (raw.exit_mask(p, z) != expected).any()
    np.testing.assert_array_equal(policy.exit_mask(p, z), result_exits(result, cal, p, z))


def result_exits(result, cal, p, z):
    return scrc_exits(expit(PLATT["a"] * z + PLATT["b"]), cal.predict_proba(p), result.lambda1, result.lambda2)[0]


def test_decide_reports_sets_and_calibrated_answers(fitted):
    cal, result, (p, z, _) = fitted
    policy = SCRCExitPolicy(result.lambda1, result.lambda2, cal.to_dict(), PLATT)
    d = policy.decide(p, gate_scores=z)
    assert isinstance(d, Decisions) and isinstance(d, SCRCDecisions) and len(d) == p.shape[0]
    q = cal.predict_proba(p)
    np.testing.assert_allclose(d.p_roadwork, q[:, 1])
    np.testing.assert_array_equal(d.label, q.argmax(axis=1))
    np.testing.assert_array_equal(d.exit, policy.exit_mask(p, z))
    assert d.exit.any() and (~d.exit).any()
    for e, lab, s, scrc_set, sel in zip(d.exit, d.label, d.prediction_sets, d.scrc_sets, d.selected):
        if e:
            assert s == (lab,) and scrc_set == (lab,)
        else:
            assert s == DEFERRED_SET
            assert scrc_set is None if not sel else scrc_set in ((0, 1), ())
    assert d.selected.sum() > d.exit.sum()  # some selected samples defer with the full set
    records = d.to_records()
    assert records[int(np.flatnonzero(~d.exit)[0])]["label"] is None


def test_gate_scores_are_required_and_checked(fitted):
    cal, result, (p, z, _) = fitted
    policy = SCRCExitPolicy(result.lambda1, result.lambda2, cal.to_dict(), PLATT)
    with pytest.raises(ValueError, match="gate_scores"):
        policy.exit_mask(p)
    with pytest.raises(ValueError, match="gate_scores"):
        policy.decide(p)
    with pytest.raises(ValueError, match="entries"):
        policy.exit_mask(p, z[:-1])
    with pytest.raises(ValueError, match="finite"):
        policy.exit_mask(p[:2], np.array([0.0, np.nan]))


def test_null_thresholds_exit_nothing_and_bad_thresholds_are_refused(fitted):
    cal, _, (p, z, _) = fitted
    policy = SCRCExitPolicy(None, None, cal.to_dict(), PLATT)
    d = policy.decide(p, z)
    assert not d.exit.any() and all(s == DEFERRED_SET for s in d.prediction_sets)
    assert all(s is None for s in d.scrc_sets)
    with pytest.raises(ValueError, match="both"):
        SCRCExitPolicy(0.5, None)
    with pytest.raises(ValueError, match="lambda2"):
        SCRCExitPolicy(0.5, 1.5)
    with pytest.raises(TypeError):
        SCRCExitPolicy("0.5", 0.7)
    with pytest.raises(ValueError, match="class calibrator"):
        SCRCExitPolicy(0.5, 0.7, {"method": "beta"})
    with pytest.raises(ValueError, match="lacks"):
        SCRCExitPolicy.from_dict({"lambda1": 0.5, "lambda2": 0.7})


def test_identity_calibrators_and_half_reduce_to_the_gate_rule():
    rng = np.random.default_rng(3)
    p = binary(rng.uniform(0.01, 0.99, size=300))
    z = rng.normal(size=300)
    policy = SCRCExitPolicy(0.6, 0.5)  # calibrator and gate calibrator default to identity/sigmoid
    np.testing.assert_array_equal(policy.exit_mask(p, z), expit(z) >= 0.6)


def test_file_round_trip_with_schema(tmp_path, fitted):
    cal, result, (p, z, _) = fitted
    doc = scrcparams_document(result, cal.to_dict(), PLATT, "ckpt-abc", 0.5, result.coverage)
    path = write_json(tmp_path / SCRCExitPolicy.policy_file, doc, schema=SCRCExitPolicy.schema)
    assert read_json(path, schema="scrcparams") == doc
    policy = SCRCExitPolicy.from_file(path)
    assert (policy.lambda1, policy.lambda2) == (result.lambda1, result.lambda2)
    np.testing.assert_array_equal(policy.exit_mask(p, z), result.calib_exits)
    other = dict(doc, policy="gate")
    bad = tmp_path / "bad.json"
    bad.write_text(__import__("json").dumps(other))
    with pytest.raises(ArtifactError):
        SCRCExitPolicy.from_file(bad)
    with pytest.raises(ArtifactError):
        write_json(tmp_path / "x.json", dict(doc, gate_calibrator={"method": "isotonic"}), schema="scrcparams")


# ----- SCRC-T: thresholds recomputed from val_calib and each batch ----------------------------


def transductive_policy(tmp_path, fitted, min_test=20):
    from stage1_core.calibration.scrc import scrc_transductive
    from stage1_core.policies.scrc import CALIBRATION_FILE, save_calibration_outputs

    cal, _, (p, z, y) = fitted
    q, g = SCRCExitPolicy(None, None, cal.to_dict(), PLATT).calibrated(p, z)
    ref = scrc_transductive(g, q, y, g[:0], q[:0], 0.02, 0.8, min_test=0, delta=0.05)
    settings = {"selection_rate": 0.8, "min_test": min_test, "calibration_file": CALIBRATION_FILE}
    doc = scrcparams_document(ref, cal.to_dict(), PLATT, "ckpt-t", 0.5, ref.coverage, transductive=settings)
    path = write_json(tmp_path / SCRCExitPolicy.policy_file, doc, schema="scrcparams")
    save_calibration_outputs(tmp_path / CALIBRATION_FILE, p, z, y)
    return path, (g, q, y)


def test_transductive_policy_recomputes_its_thresholds_from_each_batch(tmp_path, fitted):
    from stage1_core.calibration.scrc import scrc_transductive

    path, (g, q, y) = transductive_policy(tmp_path, fitted)
    policy = SCRCExitPolicy.from_file(path)
    assert policy.variant == "SCRC-T" and policy.min_batch == 20
    assert policy.companion_files() == {"scrc_calibration.pt": tmp_path / "scrc_calibration.pt"}
    rng = np.random.default_rng(5)
    for n in (20, 300):
        p_t, z_t, _ = raw_outputs(n, rng)
        d = policy.decide(p_t, z_t)
        q_t, g_t = policy.calibrated(p_t, z_t)
        expected = scrc_transductive(g, q, y, g_t, q_t, 0.02, 0.8, min_test=20)
        assert (d.lambda1, d.lambda2) == (expected.lambda1, expected.lambda2)
        np.testing.assert_array_equal(d.exit, scrc_exits(g_t, q_t, expected.lambda1, expected.lambda2)[0])
        np.testing.assert_allclose(d.probs, q_t)
        assert all(s == (int(lab),) if e else s == DEFERRED_SET
                   for s, e, lab in zip(d.prediction_sets, d.exit, d.label))
    with pytest.raises(ValueError, match="at least 20 samples together"):
        policy.decide(*raw_outputs(19, rng)[:2])
    # from_dict/to_dict round-trip keeps the val_calib outputs; without them SCRC-T cannot be built.
    again = SCRCExitPolicy.from_dict(policy.to_dict())
    p_t, z_t, _ = raw_outputs(50, rng)
    np.testing.assert_array_equal(again.decide(p_t, z_t).exit, policy.decide(p_t, z_t).exit)
    with pytest.raises(ValueError, match="from_file"):
        SCRCExitPolicy.from_dict({k: v for k, v in policy.to_dict().items() if k != "calibration_data"})
    with pytest.raises(ValueError, match="not loaded from a file"):
        again.companion_files()


def test_transductive_policy_file_needs_its_companion(tmp_path, fitted):
    path, _ = transductive_policy(tmp_path, fitted)
    (tmp_path / "scrc_calibration.pt").unlink()
    with pytest.raises(ArtifactError, match="scrc_calibration.pt"):
        SCRCExitPolicy.from_file(path)
    (tmp_path / "scrc_calibration.pt").write_bytes(b"not a tensor file")
    with pytest.raises(ArtifactError, match="scrc_calibration.pt"):
        SCRCExitPolicy.from_file(path)


def test_inductive_policy_has_no_companion_and_decides_any_batch(fitted):
    cal, result, (p, z, _) = fitted
    policy = SCRCExitPolicy(result.lambda1, result.lambda2, cal.to_dict(), PLATT)
    assert policy.variant == "SCRC-I" and policy.min_batch == 1 and policy.companion_files() == {}
    d = policy.decide(p[:1], z[:1])
    assert (d.lambda1, d.lambda2) == (result.lambda1, result.lambda2) and d.reason is None
    assert SCRCExitPolicy(None, None).decide(p[:3], z[:3]).reason == "nothing was certified"
