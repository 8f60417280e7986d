"""Stage1ProConfig: defaults, validation messages, legacy names, save/load with the schema."""

import json

import pytest

from stage1_core.artifacts import ArtifactError, load_schema
from stage1_core.config import ConfigError, Stage1ProConfig, config_json_schema

BASELINE_FIELDS = {
    "model_path", "train_image_dir", "train_labels_file", "val_image_dir", "val_labels_file", "mode",
    "cached_features_dir", "use_extra_roadwork", "roadwork_iccv_dir", "roadwork_extra_dir", "max_batch_size",
    "fallback_batch_size", "grad_accum_steps", "epochs", "warmup_epochs", "lr_head", "lr_backbone",
    "weight_decay", "dropout", "label_smoothing", "max_grad_norm", "use_amp", "use_ema", "ema_decay",
    "early_stop_patience", "legacy_exit_threshold_for_logging", "resume_checkpoint", "output_dir", "log_file",
}


def test_has_every_baseline_field_with_baseline_defaults():
    cfg = Stage1ProConfig()
    assert BASELINE_FIELDS <= set(Stage1ProConfig.model_fields)
    assert (cfg.max_batch_size, cfg.fallback_batch_size, cfg.grad_accum_steps) == (64, 32, 2)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr_head, cfg.lr_backbone) == (10, 1, 1e-4, 1e-5)
    assert (cfg.weight_decay, cfg.dropout, cfg.label_smoothing, cfg.max_grad_norm) == (0.01, 0.3, 0.1, 1.0)
    assert (cfg.ema_decay, cfg.early_stop_patience, cfg.legacy_exit_threshold_for_logging) == (0.9999, 3, 0.88)


def test_phase_defaults():
    cfg = Stage1ProConfig()
    assert (cfg.val_select_ratio, cfg.val_calib_ratio, cfg.val_test_ratio) == (0.33, 0.33, 0.34)
    assert cfg.target_fnr_exit == 0.02 and cfg.fnr_confidence == 0.95
    assert cfg.delta == pytest.approx(0.05)
    assert cfg.exit_policy == "softmax" and cfg.bootstrap_samples == 1000 and cfg.deploy_prior == 0.5


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"dropout": 1.0}, "dropout=1.0 is invalid: must be in [0, 1)"),
        ({"lr_head": 0.0}, "lr_head=0.0 is invalid: must be > 0"),
        ({"lr_backbone": -1e-5}, "lr_backbone=-1e-05 is invalid: must be > 0"),
        ({"epochs": 0}, "epochs=0 is invalid: must be > 0"),
        ({"epochs": 3, "warmup_epochs": 3}, "warmup_epochs=3 is invalid: must be in [0, epochs=3)"),
        ({"val_select_ratio": 0.5}, "must sum to 1"),
        ({"val_calib_ratio": 0.0, "val_select_ratio": 0.66}, "val_calib_ratio=0.0 is invalid"),
        ({"target_fnr_exit": 0.2}, "target_fnr_exit=0.2 is invalid: must be in (0, 0.1]"),
        ({"target_fnr_exit": 0.0}, "target_fnr_exit=0.0 is invalid"),
        ({"phase": 2, "exit_policy": "gate"}, "exit_policy='gate' is invalid for phase 2"),
        ({"phase": 5, "exit_policy": "scrc"}, "exit_policy='scrc' is invalid for phase 5"),
        ({"model_path": "builtin:huge"}, "model_path='builtin:huge' is invalid"),
    ],
)
def test_invalid_values_name_field_value_and_range(changes, fragment):
    with pytest.raises(ConfigError) as info:
        Stage1ProConfig.from_dict(changes)
    assert fragment in str(info.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        Stage1ProConfig.from_dict({"dropout": 2.0, "epochs": 0, "deploy_prior": 1.5})
    assert len(info.value.problems) >= 3


def test_policies_allowed_by_phase():
    assert Stage1ProConfig.from_dict({"phase": 3, "exit_policy": "gate"}).exit_policy == "gate"
    assert Stage1ProConfig.from_dict({"phase": 6, "exit_policy": "scrc"}).exit_policy == "scrc"


@pytest.mark.parametrize("data", [{"target_coverage": 0.8}, {"nested": {"target_coverage": 0.8}}])
def test_target_coverage_rejected_with_explanation(data):
    with pytest.raises(ConfigError, match="only constraint is target_fnr_exit"):
        Stage1ProConfig.from_dict(data)


def test_unknown_field_rejected():
    with pytest.raises(ConfigError, match="lr_haed: unknown field"):
        Stage1ProConfig.from_dict({"lr_haed": 1e-3})


def test_exit_threshold_is_the_old_name_of_the_logging_threshold():
    cfg = Stage1ProConfig.from_dict({"exit_threshold": 0.9})
    assert cfg.legacy_exit_threshold_for_logging == 0.9
    assert "exit_threshold" not in cfg.to_json_dict()


def test_dataset_availability_lists_every_missing_path(tmp_path):
    cfg = Stage1ProConfig.from_dict(
        {"train_image_dir": str(tmp_path / "a"), "train_labels_file": str(tmp_path / "b.csv"),
         "val_image_dir": str(tmp_path), "val_labels_file": None}
    )
    problems = cfg.dataset_problems()
    assert len(problems) == 3
    assert any("train_image_dir" in p for p in problems) and any("val_labels_file is not set" in p for p in problems)
    with pytest.raises(ConfigError):
        cfg.validate_for_run()


def test_train_cached_needs_an_existing_cache(tmp_path):
    cfg = Stage1ProConfig.from_dict({"mode": "train_cached", "cached_features_dir": str(tmp_path), "data_source": "synthetic"})
    assert "lacks train_features.pt" in cfg.mode_problems()[0]
    (tmp_path / "train_features.pt").write_bytes(b"x")
    (tmp_path / "train_labels.pt").write_bytes(b"x")
    assert cfg.mode_problems() == []


def test_save_load_round_trip_with_provenance(tmp_path):
    cfg = Stage1ProConfig.from_dict({"seed": 7, "epochs": 5})
    path = cfg.save(tmp_path / "config.json")
    data = json.loads(path.read_text())
    assert BASELINE_FIELDS <= set(data) and data["seed"] == 7 and data["created_at"]
    loaded = Stage1ProConfig.load(path)
    assert loaded.epochs == 5 and loaded.seed == 7


def test_load_validates_against_schema(tmp_path):
    path = Stage1ProConfig().save(tmp_path / "config.json")
    data = json.loads(path.read_text())
    data["epochs"] = "ten"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"\$\.epochs"):
        Stage1ProConfig.load(path)


def test_load_accepts_old_key_name(tmp_path):
    path = Stage1ProConfig().save(tmp_path / "config.json")
    data = json.loads(path.read_text())
    data["exit_threshold"] = data.pop("legacy_exit_threshold_for_logging")
    path.write_text(json.dumps(data))
    assert Stage1ProConfig.load(path).legacy_exit_threshold_for_logging == 0.88


def test_committed_schema_matches_model():
    assert load_schema("config") == json.loads(json.dumps(config_json_schema()))


def test_yaml_file_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\n  bad: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+"):
        Stage1ProConfig.from_file(path)


def test_selection_accuracy_tolerance_is_a_small_fraction_or_null():
    assert Stage1ProConfig().selection_accuracy_tolerance is None
    assert Stage1ProConfig(selection_accuracy_tolerance=0.01).selection_accuracy_tolerance == 0.01
    with pytest.raises(ConfigError, match="selection_accuracy_tolerance"):
        Stage1ProConfig.from_dict({"selection_accuracy_tolerance": 0.5})
