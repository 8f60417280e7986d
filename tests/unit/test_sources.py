"""Training sources: optional extras refused when absent, or left out and named with skip_missing_sources."""

from __future__ import annotations

import logging
from pathlib import Path

from stage1_core.config import Stage1ProConfig
from stage1_core.data.sources import missing_extra_sources, training_sources


def _config(tmp_path: Path, **overrides) -> Stage1ProConfig:
    for name in ("train", "val"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / f"{name}_labels.csv").write_text("image,label\n")
    iccv = tmp_path / "iccv"
    (iccv / "train_images").mkdir(parents=True, exist_ok=True)
    (iccv / "train_labels.csv").write_text("image,label\n")
    (tmp_path / "extra_without_labels" / "train_images").mkdir(parents=True, exist_ok=True)
    values = dict(train_image_dir=str(tmp_path / "train"), train_labels_file=str(tmp_path / "train_labels.csv"),
                  val_image_dir=str(tmp_path / "val"), val_labels_file=str(tmp_path / "val_labels.csv"),
                  use_extra_roadwork=True, roadwork_iccv_dir=str(iccv),
                  roadwork_extra_dir=str(tmp_path / "extra_without_labels"),
                  use_kaggle_data=True, kaggle_construction_dir=str(tmp_path / "nowhere"))
    return Stage1ProConfig(**{**values, **overrides})


def test_by_default_absent_sources_are_refused_and_listed(tmp_path):
    config = _config(tmp_path)
    problems = config.dataset_problems()
    assert any("kaggle_construction_dir" in p and "does not exist" in p for p in problems)
    assert any("kaggle_road_issues_dir is not set" in p for p in problems)
    assert [name for name, *_ in training_sources(config)] == [
        "natix", "roadwork_iccv", "roadwork_extra", "kaggle_construction", "kaggle_road_issues"]


def test_skip_missing_sources_goes_on_without_them_and_names_each(tmp_path, caplog):
    config = _config(tmp_path, skip_missing_sources=True)
    assert config.dataset_problems() == []
    missing = missing_extra_sources(config)
    assert set(missing) == {"roadwork_extra", "kaggle_construction", "kaggle_road_issues"}
    assert "lacks" in missing["roadwork_extra"] and "train_labels.csv" in missing["roadwork_extra"]
    with caplog.at_level(logging.WARNING, logger="stage1_core.data.sources"):
        sources = training_sources(config)
    assert sources[1] == ("roadwork_iccv", str(tmp_path / "iccv" / "train_images"),
                          str(tmp_path / "iccv" / "train_labels.csv"))
    assert [name for name, *_ in sources] == ["natix", "roadwork_iccv"]
    for name in missing:
        assert any(name in record.getMessage() for record in caplog.records), name
    # A missing required source is still refused.
    assert _config(tmp_path, skip_missing_sources=True, val_labels_file=str(tmp_path / "no.csv")).dataset_problems()


def test_configs_natix_yaml_describes_the_layout_the_code_reads():
    from stage1_core.data.sources import EXTRA_SOURCES, LABELS_NAME

    path = Path(__file__).resolve().parents[2] / "configs" / "natix.yaml"
    comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
    for _, switch, field, images in EXTRA_SOURCES:
        assert f"{images}/" in comments and switch in path.read_text(), (switch, field, images)
    assert f"{LABELS_NAME}" in comments and "holds labels.csv" not in comments
    assert Stage1ProConfig.from_file(path).skip_missing_sources is False
