"""A photo collection with byte-identical copies, through the real Dagster CLI.

Before copies were found by content, this set passed ``dataset_index`` and ``splits`` and then
crashed ``cached_features`` with "split 'train': sample ids are not unique", naming no file.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import Project, output

pytestmark = pytest.mark.slow


def write_images(folder: Path, prefix: str, n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        name = f"{prefix}_{i:03d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        rows.append((name, i % 2))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows(rows)


def csv_project(tmp_path: Path, data: Path, train_rows: list, val_rows: list) -> Project:
    """A project on the photo folder ``data`` with these labels CSVs (the builtin backbone)."""
    write_csv(data / "train_labels.csv", train_rows)
    write_csv(data / "val_labels.csv", val_rows)
    config = {"data_source": "natix", "train_image_dir": str(data / "train"),
              "train_labels_file": str(data / "train_labels.csv"), "val_image_dir": str(data / "val"),
              "val_labels_file": str(data / "val_labels.csv")}
    return Project(tmp_path / "project", config)


def test_duplicate_photos_are_reported_and_the_pipeline_runs(tmp_path):
    data = tmp_path / "photos"
    train_rows = write_images(data / "train", "t", 16, seed=1)
    val_rows = write_images(data / "val", "v", 16, seed=2)
    # One copy inside the training CSV, two training photos copied into the validation CSV.
    shutil.copy(data / "train" / "t_003.jpg", data / "train" / "t_003_copy.jpg")
    train_rows.append(("t_003_copy.jpg", train_rows[3][1]))
    for k in (5, 6):
        shutil.copy(data / "train" / f"t_{k:03d}.jpg", data / "val" / f"leak_{k}.jpg")
        val_rows.append((f"leak_{k}.jpg", train_rows[k][1]))
    project = csv_project(tmp_path, data, train_rows, val_rows)

    result = project.materialize("*cached_features", "phase1")
    assert result.returncode == 0, output(result)

    with open(project.artifacts / "dataset_index" / "duplicates.csv", newline="") as handle:
        report = list(csv.DictReader(handle))
    dropped = sorted(Path(r["dropped_path"]).name for r in report)
    assert dropped == ["leak_5.jpg", "leak_6.jpg", "t_003_copy.jpg"]
    for row in report:
        assert row["dropped_line"] and row["kept_path"]
    kept_of = {Path(r["dropped_path"]).name: Path(r["kept_path"]).name for r in report}
    assert kept_of == {"leak_5.jpg": "t_005.jpg", "leak_6.jpg": "t_006.jpg", "t_003_copy.jpg": "t_003.jpg"}
    with open(project.artifacts / "dataset_index" / "dataset_index.csv", newline="") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == 16 + 16
    assert len({row["sha256"] for row in index}) == len(index)


def test_duplicate_photos_with_conflicting_labels_are_refused_naming_both_lines(tmp_path):
    data = tmp_path / "photos"
    train_rows = write_images(data / "train", "t", 6, seed=3)
    val_rows = write_images(data / "val", "v", 6, seed=4)
    shutil.copy(data / "train" / "t_001.jpg", data / "val" / "relabelled.jpg")
    val_rows.append(("relabelled.jpg", 1 - train_rows[1][1]))
    project = csv_project(tmp_path, data, train_rows, val_rows)

    result = project.materialize("dataset_index", None)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "different labels" in text
    assert f"{data / 'train_labels.csv'}:3: {data / 'train' / 't_001.jpg'}" in text
    assert f"{data / 'val_labels.csv'}:8: {data / 'val' / 'relabelled.jpg'}" in text
