"""Each way of re-materialising a subset of assets that used to ship an inconsistent bundle is refused.

Driven through the real ``dagster`` CLI on clones of the session's phase-1 project; every refusal
names the stale asset and what to re-materialise.
"""

from __future__ import annotations

import csv
import json

import pytest

from tests.integration.conftest import clone_project, output

pytestmark = pytest.mark.slow


def test_relabelled_csv_is_used_and_features_are_reused(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path)
    labels = project.artifacts / "data" / "synthetic" / "val_labels.csv"
    rows = list(csv.reader(labels.open()))
    flipped = 0
    for row in rows[1:]:
        if row[1] == "0" and flipped < 5:
            row[1], flipped = "1", flipped + 1
    with labels.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    rebuilt = project.materialize("dataset_index,splits", None)
    assert rebuilt.returncode == 0, output(rebuilt)
    stale = project.materialize("bundle", "phase1")
    assert stale.returncode != 0, output(stale)
    assert "stale inputs" in stale.stdout + stale.stderr, output(stale)
    full = project.materialize("*bundle", "phase1")
    assert full.returncode == 0, output(full)
    cache = json.loads((project.artifacts / "cached_features" / "phase1" / "cache.json").read_text())
    assert cache["reused"] is True and cache["forward_passes"] == 0
    splits = json.loads((project.artifacts / "splits" / "splits.json").read_text())
    before = json.loads((phase1_project.artifacts / "splits" / "splits.json").read_text())
    val = ("val_select", "val_calib", "val_test")
    positives = sum(splits["splits"][s]["class_counts"]["1"] for s in val)
    assert positives == sum(before["splits"][s]["class_counts"]["1"] for s in val) + 5


def test_loosened_live_target_cannot_ship_under_the_old_certificate(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path, target_fnr_exit=0.1)
    result = project.materialize("bundle", "phase1")
    assert result.returncode != 0, output(result)
    text = result.stdout + result.stderr
    assert "exit_policy[phase1] was made with" in text and "target_fnr_exit=0.02 (config now 0.1)" in text, output(result)


def test_loosened_gate_threshold_cannot_ship_under_the_old_verdict(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path, baseline_val_accuracy=0.5)
    result = project.materialize("bundle", "phase1")
    assert result.returncode != 0, output(result)
    text = result.stdout + result.stderr
    assert "evaluation[phase1] was made with" in text and "baseline_val_accuracy=None (config now 0.5)" in text, \
        output(result)


def test_rebuilt_model_without_a_new_policy_is_refused(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path, seed=7)
    rebuilt = project.materialize("checkpoint,predictions", "phase1")
    assert rebuilt.returncode == 0, output(rebuilt)
    result = project.materialize("evaluation", "phase1")
    assert result.returncode != 0, output(result)
    text = result.stdout + result.stderr
    assert "evaluation[phase1] refused" in text and "exit_policy[phase1] was made from predictions[phase1]" in text, \
        output(result)


def test_training_seed_never_redraws_the_validation_splits(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path, seed=7)
    result = project.materialize("splits", None)
    assert result.returncode == 0, output(result)
    before = (phase1_project.artifacts / "splits" / "splits.json").read_text()
    after = (project.artifacts / "splits" / "splits.json").read_text()
    assert json.loads(before)["splits"] == json.loads(after)["splits"]


def test_another_backbone_of_the_same_width_cannot_ship_the_old_head(tmp_path, phase1_project):
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from stage1_core.model.backbone import TINY_DINOV3_CONFIG

    torch.manual_seed(1)
    other = tmp_path / "other-dinov3"
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3_CONFIG)).save_pretrained(other)
    project = clone_project(phase1_project, tmp_path / "project", model_path=str(other))
    rebuilt = project.materialize("backbone", "phase1")
    assert rebuilt.returncode == 0, output(rebuilt)
    stale = project.materialize("bundle", "phase1")
    assert stale.returncode != 0, output(stale)
    text = stale.stdout + stale.stderr
    assert "bundle[phase1] refused" in text and "backbone[phase1]" in text, output(stale)
