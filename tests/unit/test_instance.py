"""The project's Dagster instance: DAGSTER_HOME is the root, every piece of its data in .dagster_home/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stage1_assets import demo
from stage1_assets.instance import PROJECT_ROOT, instance_data_dir

REPO = Path(__file__).resolve().parents[2]


def test_the_root_dagster_yaml_sends_every_piece_of_instance_data_into_dot_dagster_home():
    assert PROJECT_ROOT == REPO and not (REPO / "configs" / "dagster.yaml").exists()
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    dirs = {
        "storage (runs, event logs, schedules)": config["storage"]["sqlite"]["base_dir"],
        "compute_logs": config["compute_logs"]["config"]["base_dir"],
        "local_artifact_storage": config["local_artifact_storage"]["config"]["base_dir"],
    }
    for what, base_dir in dirs.items():
        assert isinstance(base_dir, str) and base_dir.startswith(".dagster_home/"), (what, base_dir)
    assert config["telemetry"]["enabled"] is False
    assert ".dagster_home/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_ui_and_make_demo_use_the_project_root_as_dagster_home_and_copy_nothing():
    printed = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval",
         "print-dagster-home: ; @echo \"$$DAGSTER_HOME|$$DAGSTER_DISABLE_TELEMETRY\"", "print-dagster-home"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert printed.stdout.strip() == f"{REPO}|1"
    dry = subprocess.run(["make", "-n", "ui", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert "dagster dev -w workspace.yaml" in dry.stdout and "stage1_assets.demo" in dry.stdout
    assert "dagster.yaml" not in dry.stdout  # no copy of an instance file anywhere


def test_the_demo_writes_its_event_logs_into_the_instance_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(demo, "run_phase", lambda partition, log_dir: calls.append(log_dir) or (0, 1.0, {}))
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    assert demo.main(["--phase", "phase1"]) == 0
    assert calls == [tmp_path / ".dagster_home" / "logs"] == [instance_data_dir() / "logs"]
    assert [p.name for p in tmp_path.iterdir()] == [".dagster_home"]
