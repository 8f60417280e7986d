"""The phase table and recipe application."""

import pytest

from stage1_core.config import Stage1ProConfig
from stage1_core.phases import (
    CRITERIA, PHASE_KEYS, PHASES, PhaseUnavailableError, config_for_phase, get_recipe, phase_number, previous_phases,
)


def test_six_phases_in_order():
    assert PHASE_KEYS == [f"phase{i}" for i in range(1, 7)]


def test_phase1_and_phase2_recipes():
    one, two = get_recipe("phase1"), get_recipe(2)
    assert one.selection_metric == "accuracy" and two.selection_metric == "augrc"
    assert {c.name for c in one.criteria} >= {"training_completed", "val_accuracy_vs_baseline",
                                              "thresholds_certified", "val_test_fnr_bound", "bundle_verified"}
    assert "no_regression_vs_previous_phase" in {c.name for c in two.criteria}
    assert all(c.asset in {"backbone", "checkpoint", "exit_policy", "evaluation", "bundle"} for c in CRITERIA.values())


def test_unbuilt_phases_fail_naming_what_is_missing():
    from stage1_core.phases import PHASES

    unbuilt = [recipe for recipe in PHASES.values() if not recipe.available]
    for recipe in unbuilt:
        with pytest.raises(PhaseUnavailableError, match=f"{recipe.key} .* cannot run: .* is not part of this release"):
            get_recipe(recipe.key)


def test_phase4_and_5_adapt_the_backbone_and_fine_tune_and_phase5_is_phase4_with_fsam():
    four, five = get_recipe("phase4"), get_recipe("phase5")
    assert (four.backbone_kind, four.train_mode, four.head_kind) == ("explora", "finetune", "gated")
    assert five.optional and five.requires == (4,)
    assert (five.backbone_kind, five.train_mode, five.loss_kind) == (four.backbone_kind, four.train_mode, four.loss_kind)
    assert five.optimizers[0] == "fsam" and four.optimizers == ("adamw",)
    names4, names5 = {c.name for c in four.criteria}, {c.name for c in five.criteria}
    assert {"explora_pretraining_completed", "peft_applied_correctly", "performance_maintained",
            "no_memory_issues", "bundle_verified"} <= names4
    assert {"training_stable", "improves_over_adamw", "no_memory_issues", "bundle_verified"} <= names5


def test_phase3_recipe_names_the_gated_head_its_loss_policy_and_gate_criteria():
    three = get_recipe("phase3")
    assert (three.head_kind, three.loss_kind, three.overrides["exit_policy"]) == ("gated", "selective", "gate")
    names = {c.name for c in three.criteria}
    assert {"gate_trains", "gate_beats_softmax", "no_classification_regression", "gate_calibration_works",
            "no_regression_vs_previous_phase", "bundle_verified"} <= names
    assert config_for_phase(Stage1ProConfig(), "phase3").exit_policy == "gate"


def test_every_criterion_has_a_registered_function_and_every_phase_gate_is_non_empty():
    from stage1_core.acceptance import READERS as REGISTRY
    from stage1_core.phases import PHASES

    assert set(REGISTRY) == set(CRITERIA)
    assert all(recipe.criteria for recipe in PHASES.values() if recipe.available)


def test_config_for_phase_applies_recipe():
    cfg = config_for_phase(Stage1ProConfig(), "phase2")
    assert cfg.phase == 2 and cfg.selection_metric == "augrc" and cfg.exit_policy == "softmax"


def test_previous_phases_with_optional_phase5():
    assert previous_phases("phase1") == []
    assert previous_phases("phase2") == [1]
    assert previous_phases("phase6") == [4]
    assert previous_phases("phase6", attempted={5}) == [4, 5]


@pytest.mark.parametrize("bad", ["phase0", "phase7", "p1", "", 9])
def test_phase_number_rejects_unknown(bad):
    with pytest.raises(ValueError, match="unknown phase"):
        phase_number(bad)


def test_every_phase_has_a_recipe():
    assert sorted(PHASES) == [1, 2, 3, 4, 5, 6]


def test_each_phase_row_decides_its_optimizer():
    """``optimizer: sam`` (allowed by phase 5's row) never reaches another phase."""
    config = Stage1ProConfig(phase=5, optimizer="sam")
    assert [config_for_phase(config, n).optimizer for n in PHASES] == ["adamw"] * 4 + ["sam", "adamw"]
    assert [config_for_phase(Stage1ProConfig(), n).optimizer for n in PHASES] == ["adamw"] * 4 + ["fsam", "adamw"]


@pytest.mark.parametrize("phase", [1, 2, 3, 4, 6])
def test_a_config_picking_fsam_for_a_phase_whose_row_forbids_it_is_refused(phase):
    from stage1_core.config import ConfigError

    with pytest.raises(ConfigError, match=f"optimizer='fsam' is invalid for phase {phase}: its row trains with adamw"):
        Stage1ProConfig.from_dict({"phase": phase, "optimizer": "fsam"})
    if phase < 6:
        with pytest.raises(ConfigError, match=f"exit_policy='scrc' is invalid for phase {phase}"):
            Stage1ProConfig.from_dict({"phase": phase, "exit_policy": "scrc"})


def test_config_validation_tables_match_the_phase_rows():
    from stage1_core.config import OPTIMIZERS_BY_PHASE, POLICIES_BY_PHASE

    assert OPTIMIZERS_BY_PHASE == {n: recipe.optimizers for n, recipe in PHASES.items()}
    assert POLICIES_BY_PHASE == {n: recipe.exit_policies for n, recipe in PHASES.items()}
