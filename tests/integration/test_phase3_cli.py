"""Phase 3 end to end through the real ``dagster`` CLI, after phases 1 and 2.

Trains the gated head on phase 1's cached features, certifies the gate policy on val_calib,
evaluates it next to the softmax policy on val_test, and ships a bundle whose only policy file is
gateparams.json; ``stage1 predict`` serves it unchanged.
"""

from __future__ import annotations

import json

import pytest

from stage1_core.phases import PHASES
from tests.integration.conftest import clone_project, output

pytestmark = pytest.mark.slow


def test_phase3_after_phase2_ships_a_gate_bundle(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path)
    two = project.materialize("+bundle", "phase2")
    assert two.returncode == 0, output(two)
    three = project.materialize("+bundle", "phase3")
    assert three.returncode == 0, output(three)
    cache = json.loads((project.artifacts / "cached_features" / "phase3" / "cache.json").read_text())
    assert cache["reused"] is True and cache["forward_passes"] == 0
    policy_dir = project.artifacts / "exit_policy" / "phase3"
    gateparams = json.loads((policy_dir / "gateparams.json").read_text())
    assert gateparams["certified"] and not (policy_dir / "thresholds.json").exists()
    records = project.check_records("phase3")
    expected = {c.name for c in PHASES[3].criteria}
    assert all(records[name] is True for name in expected), records
    bundle = project.artifacts / "bundle" / "phase3" / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["active_exit_policy"] == "gate" and manifest["policy_file"] == "gateparams.json"
    assert not (bundle / "thresholds.json").exists()
    assert project.stage1("bundle", "verify", str(bundle)).returncode == 0
    evaluation = json.loads((project.artifacts / "evaluation" / "phase3" / "evaluation.json").read_text())
    comparison = evaluation["gate_comparison"]
    assert comparison["gate"]["coverage"] > comparison["softmax"]["coverage"]
    images = sorted((project.artifacts / "data" / "synthetic" / "val").iterdir())[:4]
    predicted = project.stage1("predict", "--bundle", str(bundle), *map(str, images), "--json")
    assert predicted.returncode == 0, output(predicted)
    rows = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4 and all(set(r["prediction_set"]) <= {0, 1} for r in rows)
    table = project.stage1("summary", "--all")
    assert "phase3" in table.stdout and "gate" in table.stdout, output(table)
