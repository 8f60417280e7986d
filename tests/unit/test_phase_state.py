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
