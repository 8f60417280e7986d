"""A new acceptance criterion plugs in from outside the package: this module declares one.

Declaration, reader and pure rule sit together here; phase 1's row names the criterion for the
test, and the real ``evaluate_criterion`` decides and records it. No project file knows it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stage1_core import pipeline
from stage1_core.acceptance import CRITERIA, READERS, compare, declare, reader
from stage1_core.artifacts import read_json
from stage1_core.config import Stage1ProConfig
from stage1_core.gates import GateVerdict
from stage1_core.phases import PHASES
from tests.unit.test_pipeline import CONFIG, write_feature_phase

NAME = "toy_features_cached_once"


def check_forward_passes(forward_passes: int, n_images: int) -> GateVerdict:
    """Pure rule: the feature cache did at most one forward pass per image (non-inferiority, margin 0)."""
    result = compare(forward_passes, n_images, margin=0, higher_is_better=False)
    return GateVerdict(NAME, result.passed, f"{forward_passes} forward passes for {n_images} images",
                       result.figures())


@pytest.fixture
def toy_criterion():
    declare(NAME, "cached_features", "the feature cache did at most one forward pass per image")

    @reader(NAME)
    def _read(ctx):
        ctx.require("cached_features-check", [("cached_features", ctx.partition)])
        pointer = read_json(ctx.layout.path("cached_features", ctx.partition) / "cache.json")
        return check_forward_passes(int(pointer["forward_passes"]), int(ctx.cfg.synthetic_n_train))

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(PHASES, 1, dataclasses.replace(PHASES[1], criteria=(*PHASES[1].criteria, CRITERIA[NAME])))
            yield
    finally:
        CRITERIA.pop(NAME, None)
        READERS.pop(NAME, None)


def test_a_criterion_declared_in_a_test_module_is_decided_and_recorded(toy_criterion, tmp_path):
    from stage1_core.store import read_verdicts

    config = Stage1ProConfig.from_dict(CONFIG)
    layout = write_feature_phase(tmp_path, config, np.random.default_rng(0))
    verdict = pipeline.evaluate_criterion(NAME, config, layout, "phase1")
    assert verdict.passed, verdict.message
    assert verdict.figures["shortfall"] < 0 and verdict.figures["direction"] == "non-inferiority"
    recorded = read_verdicts(layout, "phase1")[NAME]
    assert recorded["passed"] and recorded["asset"] == "cached_features"
    assert not pipeline.evaluate_criterion(NAME, config, layout, "phase2").figures.get("applicable", True)


def test_the_toy_rule_fails_when_the_cache_recomputed():
    verdict = check_forward_passes(12, 10)
    assert not verdict.passed and verdict.figures["shortfall"] == 2
