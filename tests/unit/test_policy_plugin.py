"""A new exit policy plugs in from outside the package: this module defines and registers one.

``MarginExitPolicy`` (exit iff |p1 - p0| >= m, m certified on val_calib) lives only here, with its
schema registered in code. Phase 1's row is pointed at it for the test (the phase table is where a
phase names its policy), and the real step functions fit, certify, evaluate, export, load and
predict with it; no project file knows the policy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stage1_core import pipeline
from stage1_core.artifacts import read_json, register_schema, unregister_schema
from stage1_core.calibration.threshold_sweep import certify_score_threshold
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import PHASES
from stage1_core.policies import POLICIES, ExitPolicy, FitInputs, FittedPolicy, register_policy
from tests.unit.test_pipeline import CONFIG, write_feature_phase

NAME = "toy_margin"
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["policy", "margin", "certified", "coverage", "target_fnr", "delta", "checkpoint_id"],
    "properties": {"policy": {"const": NAME}, "margin": {"type": ["number", "null"]}},
}


class MarginExitPolicy(ExitPolicy):
    """Exit when the two class probabilities differ by at least the certified margin."""

    name = NAME
    policy_file = "toymargin.json"
    schema = "toymargin"
    threshold_key = "margin"
    exit_rule = "its two class probabilities differ by at least t"
    settings = ("deploy_prior",)

    def __init__(self, margin: float | None):
        self.margin = margin

    @staticmethod
    def score(probs: np.ndarray) -> np.ndarray:
        return np.abs(probs[:, 1] - probs[:, 0])

    @classmethod
    def fit(cls, inputs: FitInputs) -> FittedPolicy:
        calib, cfg = inputs.take("calibrate"), inputs.cfg
        result = certify_score_threshold(cls.score(calib.probs), calib.probs.argmax(1), calib.labels,
                                         cfg.target_fnr_exit, cfg.delta)
        doc = {"policy": NAME, "margin": result.exit_threshold, "certified": bool(result.certified),
               "coverage": float(result.coverage), "target_fnr": cfg.target_fnr_exit, "delta": cfg.delta,
               "fnr_upper_bound": float(result.fnr_upper_bound), "checkpoint_id": inputs.checkpoint_id,
               "n_calib": int(result.n_calib), "n_exited_positives": int(result.n_exited_positives)}
        return FittedPolicy(doc, {"certified": doc["certified"], "margin": doc["margin"]})

    @classmethod
    def evaluation_extras(cls, certificate, probs, gate_logits, decisions, labels, cfg, out_dir):
        return {"toy_margin_comparison": {"mean_margin_of_exits": float(cls.score(probs)[decisions.exit].mean())}}, {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MarginExitPolicy":
        return cls(data["margin"])

    def to_dict(self) -> dict[str, Any]:
        return {"policy": NAME, "margin": self.margin}

    def exit_mask(self, probs, gate_scores=None):
        if self.margin is None:
            return np.zeros(len(probs), dtype=bool)
        return self.score(np.asarray(probs)) >= self.margin


@pytest.fixture
def toy_phase1(tmp_path):
    """Phase 1 deploying the toy policy, with features and splits written (no images)."""
    register_schema("toymargin", SCHEMA)
    register_policy(MarginExitPolicy)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(PHASES, 1, dataclasses.replace(
                PHASES[1], exit_policies=("softmax", NAME), overrides={**PHASES[1].overrides, "exit_policy": NAME}))
            config = Stage1ProConfig.from_dict(CONFIG)
            layout = write_feature_phase(tmp_path / "artifacts", config, np.random.default_rng(0))
            yield config, layout
    finally:
        POLICIES.pop(NAME, None)
        unregister_schema("toymargin")


def test_a_policy_registered_from_a_test_module_runs_through_every_step(toy_phase1):
    from stage1_core.bundle.load import Stage1Bundle

    config, layout = toy_phase1
    pipeline.train_phase(config, layout, "phase1")
    pipeline.predict_splits(config, layout, "phase1")
    fitted = pipeline.fit_exit_policy(config, layout, "phase1")
    doc = read_json(Path(fitted.path), schema="toymargin")
    assert fitted.metadata["policy"] == NAME and doc["certified"] and 0 < doc["margin"] < 1
    assert not (layout.root / "exit_policy" / "phase1" / "thresholds.json").exists()

    assert pipeline.evaluate_criterion("thresholds_certified", config, layout, "phase1").passed
    evaluated = pipeline.evaluate_phase(config, layout, "phase1")
    evaluation = read_json(layout.root / "evaluation" / "phase1" / "evaluation.json", schema="evaluation")
    assert evaluation["policy"] == NAME and 0 < evaluation["toy_margin_comparison"]["mean_margin_of_exits"] <= 1
    assert evaluated.metadata["policy"] == NAME

    pipeline.export_phase_bundle(config, layout, "phase1", run_id="toy")
    directory = pipeline.bundle_dir(layout, "phase1")
    bundle = Stage1Bundle.load(directory)
    assert bundle.manifest["active_exit_policy"] == NAME and bundle.manifest["policy_file"] == "toymargin.json"
    assert bundle.manifest["headline"]["exit_threshold"] == doc["margin"]
    assert "differ by at least t" in (directory / "README.md").read_text()
    problems, compared, mismatched = pipeline.compare_bundle_decisions(directory, layout, "phase1")
    assert problems == [] and compared == evaluation["n_test"] and mismatched == 0
    assert pipeline.evaluate_criterion("bundle_verified", config, layout, "phase1").passed

    features, _ = pipeline.load_split_features(layout, "phase1", "val_test")
    decisions = bundle.decide_features(features)
    probs = bundle.predict_proba_from_features(features)
    np.testing.assert_array_equal(decisions.exit, MarginExitPolicy.score(probs) >= doc["margin"])


def test_the_config_refuses_the_policy_in_a_phase_whose_row_does_not_name_it(toy_phase1):
    from stage1_core.config import ConfigError

    with pytest.raises(ConfigError, match=rf"exit_policy='{NAME}' is invalid for phase 2"):
        Stage1ProConfig.from_dict({"phase": 2, "exit_policy": NAME})
    with pytest.raises(ConfigError, match="unknown exit policy"):
        Stage1ProConfig.from_dict({"phase": 1, "exit_policy": "no_such_policy"})
