"""The settings each asset records in its lineage: a gate criterion's threshold makes the judged asset stale."""

from __future__ import annotations

import pytest

from stage1_core.config import Stage1ProConfig
from stage1_core.phases import PHASES
from stage1_core.steps.params import CRITERION_FIELDS, expected_params

CONFIG = Stage1ProConfig()


def _phase_with(criterion: str) -> str:
    return next(r.key for r in PHASES.values() if r.available and criterion in {c.name for c in r.criteria})


@pytest.mark.parametrize("criterion, field, value", [
    ("val_accuracy_vs_baseline", "baseline_val_accuracy", 0.5),
    ("gate_beats_softmax", "gate_min_gain", 0.2),
    ("no_classification_regression", "exit_accuracy_margin", 0.05),
    ("improves_over_adamw", "fsam_min_gain", 0.01),
    ("no_memory_issues", "memory_budget_gb", 1.0),
    ("training_stable", "loss_spike_factor", 50.0),
])
def test_a_criterion_setting_is_recorded_with_the_asset_it_judges_only(criterion, field, value):
    partition = _phase_with(criterion)
    judged = next(c.asset for c in PHASES[int(partition[-1])].criteria if c.name == criterion)
    changed = CONFIG.model_copy(update={field: value})
    for asset in ("checkpoint", "exit_policy", "evaluation"):
        before = expected_params(f"{asset}[{partition}]", CONFIG)
        after = expected_params(f"{asset}[{partition}]", changed)
        if asset == judged:
            assert before[field] != after[field] == value, f"{field} must make {asset}[{partition}] stale"
        else:
            assert before == after, f"{field} is not read by {asset}[{partition}]'s criteria"


def test_every_recorded_criterion_setting_is_a_config_field_of_a_known_criterion():
    names = {c.name for r in PHASES.values() for c in r.criteria}
    for criterion, fields in CRITERION_FIELDS.items():
        assert criterion in names
        for field in fields:
            assert field in Stage1ProConfig.model_fields


def test_a_phase_without_the_criterion_does_not_record_its_setting():
    phase1 = PHASES[1]
    assert "gate_beats_softmax" not in {c.name for c in phase1.criteria}
    assert "gate_min_gain" not in expected_params("evaluation[phase1]", CONFIG)
