"""Skip records of optional phases: who, when, why; only optional phases; a reason is required."""

import pytest

from stage1_core.phase_state import read_skip, skip_phase, unskip_phase
from stage1_core.steps.backbone import previous_backbone_phase
from stage1_core.steps.context import Layout


def test_skip_records_reason_and_unskip_removes_it(tmp_path):
    layout = Layout(tmp_path)
    assert read_skip(layout, "phase5") is None
    record = skip_phase(layout, "phase5", "  no GPU budget this week ", by="tester")
    assert record["reason"] == "no GPU budget this week" and record["by"] == "tester"
    assert read_skip(layout, 5)["reason"] == "no GPU budget this week"
    assert unskip_phase(layout, "phase5") is True
    assert read_skip(layout, "phase5") is None
    assert unskip_phase(layout, "phase5") is False


def test_only_optional_phases_can_be_skipped_and_a_reason_is_required(tmp_path):
    with pytest.raises(ValueError, match="phase4 is not optional"):
        skip_phase(tmp_path, "phase4", "because")
    with pytest.raises(ValueError, match="needs a reason"):
        skip_phase(tmp_path, "phase5", "   ")


def _checkpoint_record(layout: Layout, partition: str) -> None:
    directory = layout.dir("checkpoint", partition)
    (directory / "lineage.json").write_text("{}")


def test_phase6_builds_on_phase5_only_when_it_was_attempted_and_not_skipped(tmp_path):
    layout = Layout(tmp_path)
    _checkpoint_record(layout, "phase4")
    assert previous_backbone_phase(layout, "phase6") == "phase4"
    _checkpoint_record(layout, "phase5")
    assert previous_backbone_phase(layout, "phase6") == "phase5"
    skip_phase(layout, "phase5", "F-SAM not worth it here")
    assert previous_backbone_phase(layout, "phase6") == "phase4"


def test_a_plain_path_is_the_artifacts_root_not_its_anchor(tmp_path):
    # Path("/x/y").root is "/": the CLI passes a Path, and the record must land under it.
    record = skip_phase(tmp_path / "artifacts", "phase5", "no GPU", by="tester")
    assert (tmp_path / "artifacts" / "phase_state" / "phase5.skip.json").is_file()
    assert read_skip(tmp_path / "artifacts", "phase5") == record
    assert read_skip(Layout(tmp_path / "artifacts"), "phase5") == record
    assert unskip_phase(str(tmp_path / "artifacts"), "phase5") is True


def test_prerequisite_failures_name_each_failing_line_of_the_phases_built_on():
    from stage1_core.phase_state import prerequisite_failures

    assert prerequisite_failures("phase1", set(), {}) == []
    assert prerequisite_failures("phase2", set(), {"phase1": []}) == []
    lines = prerequisite_failures("phase3", set(), {"phase2": ["bundle_verified: never evaluated"]})
    assert lines == ["phase2.bundle_verified: never evaluated"]
    # A phase whose failures were not collected counts as never evaluated, never as passed.
    assert prerequisite_failures("phase2", set(), {}) == ["phase1.its gate was never evaluated"]


def test_an_attempted_optional_phase_blocks_phase6_until_it_passes_or_is_skipped():
    from stage1_core.phase_state import prerequisite_failures

    failing = {"phase4": [], "phase5": ["training_stable: failed (loss diverged)"]}
    assert prerequisite_failures("phase6", set(), failing) == []  # phase 5 not attempted: only phase 4 counts
    lines = prerequisite_failures("phase6", {5}, failing)
    assert lines[0] == "phase5.training_stable: failed (loss diverged)"
    assert "stage1 phase skip phase5 --reason TEXT" in lines[1] and "make demo PHASE=phase5" in lines[1]


def test_recorded_gate_failures_apply_the_dagster_rule_to_the_recorded_verdicts(tmp_path):
    from stage1_core.artifacts import write_json
    from stage1_core.phase_state import attempted_optional_phases, recorded_gate_failures, root_prerequisite_failures
    from stage1_core.phases import PHASES

    layout = Layout(tmp_path)
    names = [c.name for c in PHASES[1].criteria]
    assert recorded_gate_failures(layout, "phase1") == [f"{n}: never evaluated" for n in names]
    for criterion in PHASES[1].criteria:
        write_json(layout.dir("gates", "phase1") / f"{criterion.name}.json",
                   {"criterion": criterion.name, "passed": True, "message": "ok", "figures": {},
                    "judged_id": None, "asset": criterion.asset})
    # Passed verdicts on assets that have no materialisation do not count.
    failures = recorded_gate_failures(layout, "phase1")
    assert len(failures) == len(names) and all("has no materialisation" in line for line in failures)
    assert root_prerequisite_failures(layout, "phase2") == [f"phase1.{line}" for line in failures]
    assert root_prerequisite_failures(layout, "phase1") == []
    assert attempted_optional_phases(layout) == set()
    _checkpoint_record(layout, "phase5")
    assert attempted_optional_phases(layout) == {5}
    skip_phase(layout, "phase5", "no budget", by="tester")
    assert attempted_optional_phases(layout) == set()
