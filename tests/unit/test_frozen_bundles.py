"""Bundles written by the code of commit 9d2a5e9 (before the plugin refactoring) still load and decide the same.

``tests/data/bundles_9d2a5e9/`` holds the phase-1 (softmax), phase-3 (gate) and phase-6 (SCRC-I)
bundles written by ``benchmarks/behaviour_snapshot.py record`` at that commit, and beside each
the first 200 val_test feature vectors with the decisions that commit's evaluation made on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stage1_core.bundle.load import Stage1Bundle, verify_bundle

DATA = Path(__file__).resolve().parents[1] / "data" / "bundles_9d2a5e9"


@pytest.mark.parametrize("phase, policy", [("phase1", "softmax"), ("phase3", "gate"), ("phase6", "scrc")])
def test_a_bundle_written_before_the_refactoring_loads_and_decides_the_same(phase, policy):
    assert verify_bundle(DATA / phase) == []
    bundle = Stage1Bundle.load(DATA / phase)
    assert bundle.manifest["active_exit_policy"] == policy
    expected = torch.load(DATA / f"{phase}_val_test.pt", weights_only=True)
    decisions = bundle.decide_features(expected["features"])
    np.testing.assert_array_equal(decisions.exit, expected["exit"].numpy())
    np.testing.assert_array_equal(decisions.label[decisions.exit], expected["label"].numpy()[decisions.exit])
    np.testing.assert_allclose(decisions.p_roadwork, expected["p_roadwork"].numpy(), rtol=0, atol=1e-6)
    assert 0 < decisions.exit.sum() < len(decisions.exit)
