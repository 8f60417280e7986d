"""Phase 6 on synthetic features: conformal risk training -> predictions -> SCRC policy -> evaluation
-> bundle -> every phase-6 criterion, for SCRC-I and SCRC-T (no images, no real backbone).

Phase 6 trains on the cached features of the phase it builds on. Until phases 4-5 run on cached
features here, a stand-in phase 4 (phase 3's recipe: gated head, selective loss, gate policy, on
the same features) gives phase 6 its reference; both rows are made available inside this module only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from stage1_core import pipeline
from stage1_core.artifacts import read_json
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import PHASES
from tests.unit.test_pipeline import CONFIG, write_feature_phase

PHASE6_CONFIG = {**CONFIG, "epochs": 12, "early_stop_patience": 12}


def run_phase(config, layout, partition):
    pipeline.train_phase(config, layout, partition)
    pipeline.predict_splits(config, layout, partition)
    pipeline.fit_exit_policy(config, layout, partition)
    pipeline.evaluate_phase(config, layout, partition)


@pytest.fixture(scope="module")
def phase6(tmp_path_factory):
    """Stand-in phase 4 and phase 6 (SCRC-I) trained, evaluated and bundled on synthetic features."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PHASES, 4, dataclasses.replace(PHASES[3], phase=4, requires=(3,), available=True))
        mp.setitem(PHASES, 6, dataclasses.replace(PHASES[6], available=True))
        root = tmp_path_factory.mktemp("phase6")
        config = Stage1ProConfig.from_dict(PHASE6_CONFIG)
        layout = write_feature_phase(root, config, np.random.default_rng(1), ("phase4", "phase6"))
        run_phase(config, layout, "phase4")
        run_phase(config, layout, "phase6")
        pipeline.export_phase_bundle(config, layout, "phase6", run_id="scrc-i")
        yield config, layout


@pytest.fixture
def scratch6(phase6, tmp_path):
    """A private copy of the phase-6 layout (tests that refit or tamper), phases still available."""
    config, layout = phase6
    shutil.copytree(layout.root, tmp_path / "copy", symlinks=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PHASES, 4, dataclasses.replace(PHASES[3], phase=4, requires=(3,), available=True))
        mp.setitem(PHASES, 6, dataclasses.replace(PHASES[6], available=True))
        yield config, pipeline.Layout(tmp_path / "copy")


def criteria_verdicts(config, layout):
    return {c.name: pipeline.evaluate_criterion(c.name, config, layout, "phase6") for c in PHASES[6].criteria}


def test_phase6_trains_with_crt_certifies_scrc_and_passes_every_phase6_criterion(phase6):
    config, layout = phase6
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PHASES, 4, dataclasses.replace(PHASES[3], phase=4, requires=(3,), available=True))
        mp.setitem(PHASES, 6, dataclasses.replace(PHASES[6], available=True))
        training = pipeline.read_training(layout, "phase6")
        assert training["loss_kind"] == "crt" and training["head_kind"] == "gated" and training["losses_finite"]
        policy_dir = layout.root / "exit_policy" / "phase6"
        doc = read_json(policy_dir / "scrcparams.json", schema="scrcparams")
        assert not (policy_dir / "thresholds.json").exists() and not (policy_dir / "gateparams.json").exists()
        assert doc["certified"] and doc["scrc_variant"] == "SCRC-I" and doc["calibrator_fit_split"] == "val_select"
        assert doc["calibrator"]["method"] == "dirichlet" and doc["gate_calibrator"]["method"] == "platt"
        assert doc["checkpoint_id"] == training["checkpoint_id"]
        assert doc["method_params"]["order"] in ("frontier", "gate", "softmax")
        assert {"gate", "softmax"} == set(doc["special_cases"]) and "set_statistics" in doc
        evaluation = read_json(layout.root / "evaluation" / "phase6" / "evaluation.json", schema="evaluation")
        comparison = evaluation["scrc_comparison"]
        assert {"scrc", "gate", "softmax", "coverage_gain_vs_gate", "coverage_gain_vs_softmax", "sets"} <= set(comparison)
        assert comparison["scrc"]["coverage"] == evaluation["coverage"]
        assert (comparison["lambda1"], comparison["lambda2"]) == (doc["lambda1"], doc["lambda2"])
        for figure in ("scrc_frontier.png", "policy_coverage.png", "scores_fnr_coverage.png"):
            assert (layout.root / "evaluation" / "phase6" / figure).stat().st_size > 0

        manifest = read_json(pipeline.bundle_dir(layout, "phase6") / "bundle.json", schema="bundle")
        assert manifest["active_exit_policy"] == "scrc" and manifest["policy_file"] == "scrcparams.json"
        assert not {"thresholds.json", "gateparams.json", "scrc_calibration.pt"} & set(manifest["sha256"])
        verdicts = criteria_verdicts(config, layout)
        failed = {n: v.message for n, v in verdicts.items() if not v.passed}
        assert not failed, failed
        risk = verdicts["risk_training_works"].figures
        assert risk["ablation"].startswith("phase4") and "coverage_difference" in risk and "coverage_ci_lower" in risk


def test_scrc_bundle_returns_prediction_sets_and_refuses_transductive_prediction(phase6):
    from stage1_core.bundle.load import Stage1Bundle

    config, layout = phase6
    bundle = Stage1Bundle.load(pipeline.bundle_dir(layout, "phase6"), artifacts_root=layout.root)
    assert not bundle.transductive and "SCRC" in (layout.root / "bundle" / "phase6" / "bundle" / "README.md").read_text()
    feats, labels = pipeline.load_split_features(layout, "phase6", "val_test")
    records = bundle.decide_features(feats).to_records()
    assert len(records) == len(labels) and all("prediction_set" in r for r in records)
    assert all(r["prediction_set"] == ([r["label"]] if r["exit"] else [0, 1]) for r in records)
    with pytest.raises(ValueError, match="needs an SCRC-T policy"):
        bundle.predict(["a.jpg"] * 30, transductive=True)


def restamp_predictions(config, layout):
    ctx = pipeline.StepContext(config, layout, "phase6")
    inputs = ctx.require("predictions", [("checkpoint", "phase6"), ("cached_features", "phase6")])
    ctx.finish("predictions", ["predictions.pt", "predictions.json"], inputs)


def test_scrc_calibrators_see_val_select_and_the_certificate_only_val_calib(scratch6):
    config, layout = scratch6
    path = layout.root / "predictions" / "phase6" / "predictions.pt"
    before = read_json(layout.root / "exit_policy" / "phase6" / "scrcparams.json")
    tensors = torch.load(path, weights_only=True)
    tensors["val_test_logits"] = torch.randn_like(tensors["val_test_logits"]) * 5
    tensors["val_test_gate"] = torch.randn_like(tensors["val_test_gate"]) * 5
    torch.save(tensors, path)
    restamp_predictions(config, layout)
    pipeline.fit_exit_policy(config, layout, "phase6")
    after = read_json(layout.root / "exit_policy" / "phase6" / "scrcparams.json")
    assert {k: v for k, v in after.items() if k != "version"} == {k: v for k, v in before.items() if k != "version"}
    tensors["val_calib_logits"] = tensors["val_calib_logits"].flip(1)
    tensors["val_calib_gate"] = -tensors["val_calib_gate"]
    torch.save(tensors, path)
    restamp_predictions(config, layout)
    pipeline.fit_exit_policy(config, layout, "phase6")
    changed = read_json(layout.root / "exit_policy" / "phase6" / "scrcparams.json")
    assert changed["calibrator"] == before["calibrator"] and changed["gate_calibrator"] == before["gate_calibrator"]
    assert changed["sweep_results"] != before["sweep_results"]


def test_scrc_t_is_an_analysis_never_a_deployed_policy(scratch6):
    from stage1_core.policies import load_policy

    config, layout = scratch6
    config = config.with_updates(scrc_variant="T")
    with pytest.raises(Exception, match="scrc_variant"):  # the SCRC-I policy is stale for an SCRC-T config
        pipeline.evaluate_phase(config, layout, "phase6")
    pipeline.fit_exit_policy(config, layout, "phase6")
    policy_dir = layout.root / "exit_policy" / "phase6"
    doc = read_json(policy_dir / "scrcparams.json", schema="scrcparams")
    assert doc["scrc_variant"] == "SCRC-T" and doc["guarantee"] == "expectation" and doc["certified"]
    assert (policy_dir / doc["transductive"]["calibration_file"]).is_file()
    assert 0.0 < doc["transductive"]["selection_rate"] <= 1.0 and doc["transductive"]["selection_rate_fit_split"] == "val_select"
    record = json.loads((policy_dir / "lineage.json").read_text())
    assert "scrc_calibration.pt" in json.dumps(record)
    pipeline.evaluate_phase(config, layout, "phase6")
    # An analysis, never a deployed policy: its guarantee holds in expectation over a test batch.
    verdicts = criteria_verdicts(config, layout)
    failed = {n: v.message for n, v in verdicts.items() if not v.passed}
    assert "expectation" in failed["thresholds_certified"], failed
    with pytest.raises(ValueError, match="cannot be deployed"):
        pipeline.export_phase_bundle(config, layout, "phase6", run_id="scrc-t")
    from stage1_core.steps.training import load_prediction_outputs

    policy = load_policy("scrc", policy_dir / "scrcparams.json")
    evaluation = read_json(layout.root / "evaluation" / "phase6" / "evaluation.json")
    probs, gates, _ = load_prediction_outputs(layout, "phase6", "val_test")
    full = policy.decide(probs, gates)
    assert (full.lambda1, full.lambda2) == (evaluation["scrc_comparison"]["lambda1"], evaluation["scrc_comparison"]["lambda2"])
    part = policy.decide(probs[:40], gates[:40])  # another batch: thresholds recomputed from it and val_calib
    fresh = load_policy("scrc", policy_dir / "scrcparams.json").decide(probs[:40], gates[:40])
    assert (part.lambda1, part.lambda2) == (fresh.lambda1, fresh.lambda2)
    np.testing.assert_array_equal(part.exit, fresh.exit)
    with pytest.raises(ValueError, match="at least 20 samples"):
        policy.decide(probs[:5], gates[:5])
