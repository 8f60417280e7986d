"""Phase 3 end to end through the real ``dagster`` CLI, after phases 1 and 2.

Trains the gated head on phase 1's cached features, certifies the gate policy on val_calib and
evaluates it next to the softmax policy on val_test. On today's embedded default the phase-1
softmax policy already exits ~100% of val_test (issue 9 makes the default harder), so the gate
may have nothing to gain: then ``gate_beats_softmax`` must fail loudly with both coverages and no
bundle may ship; when it passes, the bundle's only policy file is gateparams.json and
``stage1 predict`` serves it unchanged.
"""

from __future__ import annotations

import json

import pytest

from stage1_core.phases import PHASES
from tests.integration.conftest import clone_project, output

pytestmark = pytest.mark.slow


def test_phase3_after_phase2_certifies_the_gate_and_ships_only_if_it_beats_softmax(tmp_path, phase1_project):
    project = clone_project(phase1_project, tmp_path)
    two = project.materialize("+bundle", "phase2")
    assert two.returncode == 0, output(two)
    three = project.materialize("+bundle", "phase3")
    cache = json.loads((project.artifacts / "cached_features" / "phase3" / "cache.json").read_text())
    assert cache["reused"] is True and cache["forward_passes"] == 0
    policy_dir = project.artifacts / "exit_policy" / "phase3"
    gateparams = json.loads((policy_dir / "gateparams.json").read_text())
    assert gateparams["certified"] and not (policy_dir / "thresholds.json").exists()
    assert gateparams["softmax_comparison"]["certified"]
    records = project.check_records("phase3")
    expected = [c.name for c in PHASES[3].criteria if c.asset != "bundle"]
    assert all(records[name] is not None for name in expected), records
    others = [name for name in expected if name != "gate_beats_softmax"]
    assert all(records[name] is True for name in others), records
    evaluation = json.loads((project.artifacts / "evaluation" / "phase3" / "evaluation.json").read_text())
    comparison = evaluation["gate_comparison"]
    bundle = project.artifacts / "bundle" / "phase3" / "bundle"
    summary = project.stage1("summary", "--phase", "phase3")
    if records["gate_beats_softmax"]:
        assert three.returncode == 0, output(three)
        assert comparison["gate"]["coverage"] > comparison["softmax"]["coverage"]
        manifest = json.loads((bundle / "bundle.json").read_text())
        assert manifest["active_exit_policy"] == "gate" and manifest["policy_file"] == "gateparams.json"
        assert not (bundle / "thresholds.json").exists()
        assert project.stage1("bundle", "verify", str(bundle)).returncode == 0
        images = sorted((project.artifacts / "data" / "synthetic" / "val").iterdir())[:4]
        predicted = project.stage1("predict", "--bundle", str(bundle), *map(str, images), "--json")
        assert predicted.returncode == 0, output(predicted)
        rows = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == 4 and all(set(r["prediction_set"]) <= {0, 1} for r in rows)
        assert summary.returncode == 0, output(summary)
    else:
        assert three.returncode != 0, output(three)
        assert comparison["softmax"]["coverage"] >= 0.99, comparison
        assert not bundle.exists()
        assert summary.returncode == 1 and "gate_beats_softmax FAILED" in summary.stdout, output(summary)
        assert "vs softmax" in summary.stdout, output(summary)
