"""Pipeline steps on synthetic features (no images, no backbone): policy, evaluation, bundle, gates.

Also the split rules: the exit policy may only see val_calib, evaluation only val_test.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from stage1_core import pipeline
from stage1_core.artifacts import read_json, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.datasets import Sample
from stage1_core.data.splits import SPLIT_NAMES, SplitError, make_splits, require_split, save_splits
from stage1_core.features import extract_split_features
from stage1_core.phases import CRITERIA

HIDDEN = 16
FINGERPRINT = "ab" * 32
N_TRAIN, N_VAL = 600, 2700


class IdentityBackbone:
    """Stands in for DINOv3: its 'images' are already feature vectors."""

    hidden_size = HIDDEN
    device = torch.device("cpu")
    dtype = torch.float32

    def fingerprint(self) -> str:
        return FINGERPRINT

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values


class Rows(Dataset):
    def __init__(self, x, y, ids):
        self.x, self.y, self.sample_ids = x, y, ids

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_rows(ids: list[str], labels: np.ndarray, rng: np.random.Generator) -> Rows:
    x = rng.normal(size=(len(ids), HIDDEN)).astype(np.float32)
    # Easy samples (x1 < 0.3) are separated clearly, the rest barely: a gate can learn where to defer.
    easy = x[:, 1] < 0.3
    x[:, 0] += np.where(labels == 1, 1.0, -1.0) * np.where(easy, 3.0, 0.6)
    return Rows(torch.from_numpy(x), labels, ids)


def fake_content_hash(sample_id: str) -> str:
    import hashlib

    return hashlib.sha256(sample_id.encode()).hexdigest()


def write_feature_phase(root, config, rng, partitions=("phase1",)):
    """Dataset index, splits, backbone and feature store with lineage records, without images."""
    import csv

    from stage1_core.steps.data import INDEX_COLUMNS, INDEX_FILE

    layout = pipeline.Layout(root)
    samples = {
        origin: [Sample(f"{origin}/{i:05d}.jpg", root / f"{origin}{i}.jpg", int(rng.random() < 0.9), "natix", i + 2)
                 for i in range(n)]
        for origin, n in (("train", N_TRAIN), ("val", N_VAL))
    }
    with open(layout.dir("dataset_index") / INDEX_FILE, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        for origin, group in samples.items():
            for s in group:
                writer.writerow([s.sample_id, str(s.path), s.label, s.source, origin, s.line,
                                 fake_content_hash(s.sample_id)])
    ctx = pipeline.StepContext(config, layout)
    ctx.finish("dataset_index", [INDEX_FILE], [])
    pipeline.build_splits(config, layout)
    splits, index = pipeline.read_splits(layout)
    datasets = {
        name: make_rows([fake_content_hash(i) for i in splits.ids[name]], index.labels(list(splits.ids[name])), rng)
        for name in SPLIT_NAMES
    }
    store = layout.feature_store / "test"
    ids = {name: [fake_content_hash(i) for i in splits.ids[name]] for name in SPLIT_NAMES}
    extract_split_features(IdentityBackbone(), datasets, store, "identity", sample_ids=ids, progress=False,
                           store_labels=False)
    for partition in partitions:
        phase = pipeline.StepContext(config, layout, partition)
        write_json(layout.dir("backbone", partition) / "backbone.json",
                   {"phase": partition, "model_path": "builtin:tiny-dinov3", "directory": str(root),
                    "fingerprint": FINGERPRINT, "hidden_size": HIDDEN, "adaptation": "frozen pretrained"},
                   schema="backbone")
        backbone = phase.finish("backbone", ["backbone.json"], [], id_parts={"fingerprint": FINGERPRINT})
        write_json(layout.dir("cached_features", partition) / "cache.json",
                   {"store": str(store), "key": "test", "fingerprint": FINGERPRINT, "reused": False,
                    "forward_passes": 4, "transform": "identity"}, schema="feature_pointer")
        phase.finish("cached_features", ["cache.json", store / "manifest.json"],
                     [backbone, phase.record("splits")], id_parts={"key": "test"})
    return layout


CONFIG = {"data_source": "synthetic", "epochs": 8, "lr_head": 3e-3, "grad_accum_steps": 1, "warmup_epochs": 1,
          "label_smoothing": 0.0, "early_stop_patience": 8, "bootstrap_samples": 200, "use_amp": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A layout with features, splits and backbone info, trained through phase 1's steps."""
    root = tmp_path_factory.mktemp("artifacts")
    config = Stage1ProConfig.from_dict(CONFIG)
    layout = write_feature_phase(root, config, np.random.default_rng(0))
    pipeline.train_phase(config, layout, "phase1")
    pipeline.predict_splits(config, layout, "phase1")
    pipeline.fit_exit_policy(config, layout, "phase1")
    pipeline.evaluate_phase(config, layout, "phase1")
    return config, layout


@pytest.fixture
def scratch(trained, tmp_path):
    """A private copy of the trained layout, for tests that change artifacts."""
    import shutil

    config, layout = trained
    shutil.copytree(layout.root, tmp_path / "copy", symlinks=True)
    return config, pipeline.Layout(tmp_path / "copy")


def test_phase1_steps_produce_a_certified_policy_and_passing_gates(trained):
    config, layout = trained
    thresholds = read_json(layout.root / "exit_policy" / "phase1" / "thresholds.json", schema="thresholds")
    assert thresholds["certified"] and 0.5 <= thresholds["exit_threshold"] <= 1.0
    assert thresholds["checkpoint_id"] == pipeline.read_training(layout, "phase1")["checkpoint_id"]
    policy_log = (layout.root / "exit_policy" / "phase1" / "exit_policy.log").read_text()
    assert "fitting the softmax exit policy of phase1 on val_calib" in policy_log and "softmax policy: " in policy_log
    pipeline.export_phase_bundle(config, layout, "phase1", run_id="test-run")
    bundle = pipeline.bundle_dir(layout, "phase1")
    assert (bundle / "bundle.json").is_file() and not list((layout.root / "bundle" / "phase1").glob(".staging*"))
    verdicts = {name: pipeline.evaluate_criterion(name, config, layout, "phase1") for name in CRITERIA}
    failed = {n: v.message for n, v in verdicts.items() if not v.passed}
    assert not failed, failed
    assert verdicts["no_regression_vs_previous_phase"].figures == {"applicable": False}
    lines = pipeline.read_phase_summary(layout, "phase1", config)
    assert any("certified coverage on val_calib" in line for line in lines), lines


def test_evaluation_writes_metrics_with_intervals(trained):
    _, layout = trained
    rows = {r["metric"]: r for r in pipeline.read_metrics_csv(layout, "phase1")}
    for name in ("accuracy", "mcc", "ece", "augrc", "coverage", "fnr_on_exited", "fnr_on_exited_cp_upper"):
        assert name in rows
    assert rows["accuracy"]["ci_lower"] <= rows["accuracy"]["value"] <= rows["accuracy"]["ci_upper"]
    evaluation = read_json(layout.root / "evaluation" / "phase1" / "evaluation.json")
    splits = read_json(layout.root / "splits" / "splits.json")
    assert evaluation["n_test"] == len(splits["splits"]["val_test"]["sample_ids"])
    for name in ("rejection_rate", "average_set_size", "classwise_ece"):
        assert rows[name]["ci_lower"] <= rows[name]["value"] <= rows[name]["ci_upper"], name
    assert (layout.root / "evaluation" / "phase1" / "exit_bootstrap.png").stat().st_size > 10_000
    with open(layout.root / "evaluation" / "phase1" / "training_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert log[-1]["Exit_Policy"] == "softmax"
    assert float(log[-1]["FNR_on_exited"]) == pytest.approx(rows["fnr_on_exited"]["value"], abs=1e-6)
    assert float(log[-1]["Policy_Coverage_CI_Lower"]) == pytest.approx(rows["coverage"]["ci_lower"], abs=1e-6)
    training = pipeline.read_training(layout, "phase1")
    assert training["checkpoint_sizes"]["model_best.pth"] == (layout.root / "checkpoint" / "phase1" / "model_best.pth").stat().st_size
    assert training["memory"]["device_memory_gb"] > 0 and "warning" in training["memory"]


def restamp_predictions(config, layout):
    """Re-record the predictions' lineage after a test rewrote predictions.pt."""
    ctx = pipeline.StepContext(config, layout, "phase1")
    inputs = ctx.require("predictions", [("checkpoint", "phase1"), ("cached_features", "phase1")])
    ctx.finish("predictions", ["predictions.pt", "predictions.json"], inputs)


def test_exit_policy_sees_only_val_calib(scratch):
    config, layout = scratch
    path = layout.root / "predictions" / "phase1" / "predictions.pt"
    before = read_json(layout.root / "exit_policy" / "phase1" / "thresholds.json")
    tensors = torch.load(path, weights_only=True)
    for split in ("val_select", "val_test"):
        tensors[f"{split}_logits"] = torch.randn_like(tensors[f"{split}_logits"]) * 5
    torch.save(tensors, path)
    restamp_predictions(config, layout)
    pipeline.fit_exit_policy(config, layout, "phase1")
    after = read_json(layout.root / "exit_policy" / "phase1" / "thresholds.json")
    assert after["exit_threshold"] == before["exit_threshold"] and after["coverage"] == before["coverage"]
    tensors["val_calib_logits"] = tensors["val_calib_logits"].flip(1)
    torch.save(tensors, path)
    restamp_predictions(config, layout)
    pipeline.fit_exit_policy(config, layout, "phase1")
    changed = read_json(layout.root / "exit_policy" / "phase1" / "thresholds.json")
    assert changed["exit_threshold"] != before["exit_threshold"] or changed["certified"] != before["certified"]


def test_a_changed_file_is_refused_by_its_consumer(scratch):
    from stage1_core.lineage import StaleInputError

    config, layout = scratch
    path = layout.root / "predictions" / "phase1" / "predictions.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StaleInputError, match="predictions.pt changed since it was written"):
        pipeline.fit_exit_policy(config, layout, "phase1")


def test_split_roles_are_enforced():
    require_split("val_calib", "calibrate")
    for split in ("train", "val_select", "val_test"):
        with pytest.raises(SplitError):
            require_split(split, "calibrate")
    with pytest.raises(SplitError):
        require_split("val_calib", "evaluate")
    assert set(SPLIT_NAMES) == {"train", "val_select", "val_calib", "val_test"}


def test_a_looser_live_target_makes_the_certificate_stale_instead_of_passing(trained):
    config, layout = trained
    loose = config.with_updates(target_fnr_exit=0.1)
    verdict = pipeline.evaluate_criterion("val_test_fnr_bound", loose, layout, "phase1")
    assert not verdict.passed
    assert "exit_policy[phase1] was made with" in verdict.message and "target_fnr_exit=0.02" in verdict.message
    assert pipeline.evaluate_criterion("val_test_fnr_bound", config, layout, "phase1").passed


def test_bundle_check_detects_tampering(scratch):
    config, layout = scratch
    pipeline.export_phase_bundle(config, layout, "phase1", run_id="tamper")
    bundle = pipeline.bundle_dir(layout, "phase1")
    doc = json.loads((bundle / "thresholds.json").read_text())
    doc["exit_threshold"] = 0.5
    (bundle / "thresholds.json").write_text(json.dumps(doc))
    verdict = pipeline.evaluate_criterion("bundle_verified", config, layout, "phase1")
    assert not verdict.passed and "thresholds.json" in verdict.message


def test_phase3_gate_steps_certify_and_pass_the_gate_criteria(tmp_path):
    from stage1_core.phases import PHASES

    config = Stage1ProConfig.from_dict({**CONFIG, "epochs": 12, "early_stop_patience": 12})
    layout = write_feature_phase(tmp_path, config, np.random.default_rng(1), ("phase1", "phase2", "phase3"))
    for partition in ("phase1", "phase2", "phase3"):
        pipeline.train_phase(config, layout, partition)
        pipeline.predict_splits(config, layout, partition)
        pipeline.fit_exit_policy(config, layout, partition)
        pipeline.evaluate_phase(config, layout, partition)
    gateparams = read_json(layout.root / "exit_policy" / "phase3" / "gateparams.json", schema="gateparams")
    assert not (layout.root / "exit_policy" / "phase3" / "thresholds.json").exists()
    assert gateparams["certified"] and 0.0 < gateparams["coverage"] < 1.0
    pipeline.export_phase_bundle(config, layout, "phase3", run_id="gate")
    manifest = read_json(pipeline.bundle_dir(layout, "phase3") / "bundle.json", schema="bundle")
    assert manifest["active_exit_policy"] == "gate" and manifest["head"]["with_gate"] is True
    verdicts = {c.name: pipeline.evaluate_criterion(c.name, config, layout, "phase3") for c in PHASES[3].criteria}
    evaluation = read_json(layout.root / "evaluation" / "phase3" / "evaluation.json")
    comparison = evaluation["gate_comparison"]
    assert {"gate", "softmax", "coverage_gain", "calibration"} <= set(comparison)
    # Exit accuracy is compared at softmax's coverage: the gate's matched exits are as many as softmax's.
    matched, softmax = comparison["gate_at_softmax_coverage"], comparison["softmax"]
    assert matched["coverage"] == softmax["coverage"]
    assert comparison["exit_accuracy_difference"]["difference"] == pytest.approx(
        matched["exit_accuracy"] - softmax["exit_accuracy"])
    assert "exit_accuracy_difference_at_operating_points" in comparison
    for name in ("gate_trains", "gate_calibration_works", "thresholds_certified", "bundle_verified",
                 "training_completed"):
        assert verdicts[name].passed, (name, verdicts[name].message)
    # Whether the gate beats softmax here is reported, not assumed: its verdict carries the figures.
    assert "gain" in verdicts["gate_beats_softmax"].figures


def test_bundle_id_protects_bundle_json_and_lineage_ties_head_policy_and_backbone(scratch):
    import hashlib

    from stage1_core.bundle.load import bundle_id, verify_bundle

    config, layout = scratch
    result = pipeline.export_phase_bundle(config, layout, "phase1", run_id="ids")
    bundle = pipeline.bundle_dir(layout, "phase1")
    the_id = result.metadata["bundle_id"]
    assert the_id == bundle_id(bundle) and verify_bundle(bundle, expected_id=the_id) == []
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["headline"]["target_fnr_exit"] = 0.5
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    problems = verify_bundle(bundle, expected_id=the_id)
    assert any("is not the expected" in p for p in problems), problems
    verdict = pipeline.evaluate_criterion("bundle_verified", config, layout, "phase1")
    assert not verdict.passed and "is not the expected" in verdict.message

    # A policy certified for another checkpoint, resealed with fresh checksums, is still refused.
    policy = json.loads((bundle / "thresholds.json").read_text())
    policy["checkpoint_id"] = "f" * 64
    (bundle / "thresholds.json").write_text(json.dumps(policy))
    manifest["sha256"]["thresholds.json"] = hashlib.sha256((bundle / "thresholds.json").read_bytes()).hexdigest()
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    assert any("certified for checkpoint" in p for p in verify_bundle(bundle)), verify_bundle(bundle)


def test_a_stale_bundle_is_not_reported_as_current(scratch):
    config, layout = scratch
    pipeline.export_phase_bundle(config, layout, "phase1", run_id="stale")
    assert pipeline.current_bundle_problems(config, layout, "phase1") == []
    reseeded = config.with_updates(seed=3)
    pipeline.train_phase(reseeded, layout, "phase1")
    problems = pipeline.current_bundle_problems(reseeded, layout, "phase1")
    assert problems and any("checkpoint[phase1]" in p for p in problems), problems
    status = pipeline.phase_status(reseeded, layout, "phase1")
    assert not status["bundle_current"] and status["bundle_id"] is None


def test_same_config_same_machine_gives_byte_identical_artifacts(tmp_path):
    config = Stage1ProConfig.from_dict({**CONFIG, "epochs": 3, "early_stop_patience": 3})
    runs = []
    for name in ("a", "b"):
        layout = write_feature_phase(tmp_path / name, config, np.random.default_rng(5))
        for step in (pipeline.train_phase, pipeline.predict_splits, pipeline.fit_exit_policy, pipeline.evaluate_phase):
            step(config, layout, "phase1")
        runs.append(layout.root)
    for rel in ("splits/splits.json", "exit_policy/phase1/thresholds.json", "evaluation/phase1/metrics.csv",
                "checkpoint/phase1/model_best.pth", "predictions/phase1/predictions.pt"):
        assert (runs[0] / rel).read_bytes() == (runs[1] / rel).read_bytes(), rel
    training = read_json(runs[0] / "checkpoint" / "phase1" / "training.json")
    assert {"torch", "threads", "device"} <= set(training["environment"])


def test_every_lazy_export_resolves_to_its_step_module_function():
    import importlib

    for name in pipeline.__all__:
        module = importlib.import_module(pipeline._EXPORTS[name])
        assert getattr(pipeline, name) is getattr(module, name), name
    assert set(pipeline.STEP_MODULES) == set(pipeline._EXPORTS.values())
    assert set(pipeline.__all__) <= set(dir(pipeline))
    with pytest.raises(AttributeError, match="no attribute 'train_everything'"):
        pipeline.train_everything  # noqa: B018


def test_predictions_of_val_test_stored_as_val_calib_are_refused_by_the_policy_fit(scratch, monkeypatch):
    """A wiring slip that predicts val_test's rows under the name val_calib (the old fit, which
    checked the literal name, certified on them): the rows' recorded sample ids tag them val_test."""
    from stage1_core.steps import backbone

    config, layout = scratch
    original = backbone.model_features

    def swapped(layout_, partition, split, view="deploy"):
        return original(layout_, partition, "val_test" if split == "val_calib" else split, view)

    monkeypatch.setattr(backbone, "model_features", swapped)
    pipeline.predict_splits(config, layout, "phase1")
    monkeypatch.undo()
    rows = read_json(layout.root / "predictions" / "phase1" / "predictions.json")["splits"]
    assert {r["split"]: r["n"] for r in rows}["val_calib"] == len(read_json(
        layout.root / "splits" / "splits.json")["splits"]["val_test"]["sample_ids"])
    with pytest.raises(SplitError, match="the predictions stored as 'val_calib' are of val_test's images"):
        pipeline.fit_exit_policy(config, layout, "phase1")
