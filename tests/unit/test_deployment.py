"""The deployment pipeline's settings, stores and lineage parameters."""

from __future__ import annotations

import pytest

from stage1_core.config import ConfigError, Stage1ProConfig
from stage1_core.data.challenge import PIPELINE_ID
from stage1_core.steps import deployment
from stage1_core.steps.params import params_for


def test_config_fields_validated():
    cfg = Stage1ProConfig(deploy_pipeline="streetvision", train_views=2, deploy_seed=3)
    assert deployment.deployment_enabled(cfg)
    assert not deployment.deployment_enabled(Stage1ProConfig())
    for bad in ({"train_views": 9}, {"train_views": -1}, {"deploy_seed": -1}, {"deploy_pipeline": "other"}):
        with pytest.raises((ConfigError, ValueError)):
            Stage1ProConfig.from_dict({**cfg.model_dump(), **bad})


def test_embedded_default_and_natix_use_the_pipeline():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("default.yaml", "natix.yaml"):
        assert Stage1ProConfig.from_file(root / name).deploy_pipeline == "streetvision"


def test_pipeline_settings_enter_the_feature_lineage_only_when_on():
    assert params_for("cached_features", Stage1ProConfig()) == {}
    on = params_for("cached_features", Stage1ProConfig(deploy_pipeline="streetvision", train_views=2, deploy_seed=5))
    assert on == {"deploy_pipeline": PIPELINE_ID, "deploy_seed": 5, "train_views": 2}


def test_store_names_and_specs():
    assert deployment.store_names(2, with_train=True) == ["mixture", "level0", "level1", "level2", "level3",
                                                          "train_view1", "train_view2"]
    assert deployment.store_names(2, with_train=False)[-1] == "level3"
    assert deployment._store_spec("mixture", 0) == (("val_select", "val_calib", "val_test"), 0, None)
    assert deployment._store_spec("level2", 0) == (("val_test",), 0, 2)
    assert deployment._store_spec("train_view2", 2) == (("train",), 2, None)
    with pytest.raises(ValueError):
        deployment._store_spec("train_view3", 2)
    with pytest.raises(ValueError):
        deployment._store_spec("other", 2)
