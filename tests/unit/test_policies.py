import ast
from pathlib import Path

import numpy as np
import pytest

import stage1_core.policies as policies
from stage1_core.artifacts import ArtifactError, write_json
from stage1_core.calibration.threshold_sweep import certify_softmax_threshold, thresholds_document
from stage1_core.policies import (
    POLICIES,
    Decisions,
    ExitPolicy,
    SoftmaxExitPolicy,
    load_policy,
    policy_class,
    register_policy,
)

PROBS = np.array([[0.1, 0.9], [0.5, 0.5], [0.85, 0.15], [0.2, 0.8], [0.35, 0.65]])


def _thresholds_file(tmp_path, n=800, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.8).astype(int)
    p1 = np.clip(np.where(y == 1, rng.normal(0.85, 0.15, n), rng.normal(0.2, 0.2, n)), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    res = certify_softmax_threshold(probs, y, 0.02, 0.05)
    doc = thresholds_document(res, {"ece": 0.05}, "ckpt-1", 0.5, res.coverage)
    return write_json(tmp_path / "thresholds.json", doc, schema="thresholds"), doc


def test_decide_exit_rule_labels_and_sets():
    d = SoftmaxExitPolicy(0.8).decide(PROBS)
    assert isinstance(d, Decisions) and len(d) == 5
    np.testing.assert_array_equal(d.exit, [True, False, True, True, False])  # 0.8 itself exits
    np.testing.assert_array_equal(d.label, [1, 0, 0, 1, 1])
    np.testing.assert_allclose(d.p_roadwork, PROBS[:, 1])
    assert d.prediction_sets == [(1,), (0, 1), (0,), (1,), (0, 1)]
    records = d.to_records()
    assert records[0] == {"exit": True, "label": 1, "p_roadwork": 0.9, "prediction_set": [1]}
    assert records[1]["label"] is None and records[1]["prediction_set"] == [0, 1]


def test_none_threshold_exits_nothing():
    d = SoftmaxExitPolicy(None).decide(PROBS)
    assert not d.exit.any()
    assert d.prediction_sets == [(0, 1)] * 5
    assert len(SoftmaxExitPolicy(0.9).decide(np.zeros((0, 2)))) == 0


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, "0.8", True])
def test_invalid_threshold_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        SoftmaxExitPolicy(bad)


def test_round_trip_dict():
    pol = SoftmaxExitPolicy(0.73)
    assert SoftmaxExitPolicy.from_dict(pol.to_dict()).exit_threshold == 0.73
    with pytest.raises(ValueError):
        SoftmaxExitPolicy.from_dict({"policy": "softmax"})


def test_load_from_file_and_edited_threshold_changes_decisions(tmp_path):
    path, doc = _thresholds_file(tmp_path)
    pol = load_policy("softmax", path)
    assert isinstance(pol, SoftmaxExitPolicy)
    assert pol.exit_threshold == doc["exit_threshold"] is not None
    assert SoftmaxExitPolicy.policy_file == path.name
    probs = np.stack([1 - np.linspace(0, 1, 101), np.linspace(0, 1, 101)], axis=1)
    before = pol.decide(probs).exit
    edited = dict(doc, exit_threshold=0.99)
    path2 = write_json(tmp_path / "edited" / "thresholds.json", edited, schema="thresholds")
    after = load_policy("softmax", path2).decide(probs).exit
    assert after.sum() < before.sum()
    np.testing.assert_array_equal(after, probs.max(axis=1) >= 0.99)


def test_invalid_files_refused(tmp_path):
    path, doc = _thresholds_file(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text().replace('"policy": "softmax"', '"policy": "gate"'))
    with pytest.raises(ArtifactError):
        load_policy("softmax", bad)
    with pytest.raises(ArtifactError):
        load_policy("softmax", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown exit policy"):
        load_policy("magic", path)


def test_registry_accepts_new_policies_without_other_changes(tmp_path):
    class AlwaysDefer(ExitPolicy):
        name = "always_defer_test"
        policy_file = "thresholds.json"
        schema = "thresholds"

        @classmethod
        def from_dict(cls, data):
            return cls()

        def to_dict(self):
            return {"policy": self.name}

        def exit_mask(self, probs, gate_scores=None):
            return np.zeros(len(probs), dtype=bool)

    assert POLICIES["softmax"] is SoftmaxExitPolicy
    register_policy(AlwaysDefer)
    try:
        assert policy_class("always_defer_test") is AlwaysDefer
        assert not AlwaysDefer().decide(PROBS).exit.any()
        with pytest.raises(ValueError, match="already taken"):
            register_policy(type("Other", (AlwaysDefer,), {}))
    finally:
        POLICIES.pop("always_defer_test")


def test_no_literal_threshold_in_policy_code():
    """Thresholds come from the policy file only: policy code holds no numbers but 0, 1 and the
    class count 2."""
    folder = Path(policies.__file__).parent
    for source in sorted(folder.glob("*.py")):
        tree = ast.parse(source.read_text())
        numbers = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and type(node.value) in (int, float)
        }
        assert numbers <= {0, 1, 2}, f"{source.name} holds numeric literals {sorted(numbers)}"


def test_a_policy_fit_takes_its_splits_by_the_tag_of_their_content(tmp_path):
    from stage1_core.config import Stage1ProConfig
    from stage1_core.data.splits import SplitError
    from stage1_core.policies import FitInputs, SplitOutputs

    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.8).astype(int)
    p1 = np.clip(labels * 0.9 + rng.normal(0.05, 0.05, 400), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    cfg = Stage1ProConfig()

    def inputs(**outputs):
        return FitInputs(outputs, cfg, tmp_path, "0" * 64)

    fitted = SoftmaxExitPolicy.fit(inputs(val_calib=SplitOutputs(probs, None, labels, "val_calib")))
    assert fitted.document["certified"]
    # val_test's rows under the name val_calib: the old fit (keyed by name) certified on them
    with pytest.raises(SplitError, match="'val_calib' handed to an exit-policy fit hold rows of val_test"):
        inputs(val_calib=SplitOutputs(probs, None, labels, "val_test"))
    with pytest.raises(SplitError, match="'val_calib' handed to an exit-policy fit are untagged"):
        inputs(val_calib=SplitOutputs(probs, None, labels))
    # val_select's rows cannot certify: the fit takes val_calib's by its role, and none is there
    with pytest.raises(SplitError, match="needs val_calib's outputs to calibrate, and was handed 'val_calib': val_select"):
        SoftmaxExitPolicy.fit(inputs(val_calib=SplitOutputs(probs, None, labels, "val_select")))
