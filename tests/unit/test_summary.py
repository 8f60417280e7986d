"""The per-phase overview (``stage1 summary --all`` and the bundle's ``phase_overview``): one state per phase."""

from __future__ import annotations

from pathlib import Path

from stage1_core.cli import main
from stage1_core.config import Stage1ProConfig
from stage1_core.acceptance.verdicts import record_verdict
from stage1_core.gates import GateVerdict
from stage1_core.phase_state import skip_phase
from stage1_core.phases import PHASES
from stage1_core.steps.context import Layout
from stage1_core.steps.summary import STATES, format_cell, format_table, record_failure, summary_table


def _states(layout: Layout) -> dict[str, tuple[str, str]]:
    return {row["phase"]: (row["state"], row["detail"]) for row in summary_table(Stage1ProConfig(), layout)}


def _available() -> list[str]:
    return [r.key for r in PHASES.values() if r.available and r.criteria]


def test_one_row_per_phase_and_nothing_run_reads_not_run_or_not_available(tmp_path: Path):
    states = _states(Layout(tmp_path))
    assert list(states) == [r.key for r in PHASES.values()]
    for recipe in PHASES.values():
        state, detail = states[recipe.key]
        assert state in STATES
        if recipe.key in _available():
            assert state == "not run" and "gate not run" in detail
            for number in recipe.requires:
                assert PHASES[number].key in detail, detail
        else:
            assert state == "not available"


def test_passed_failed_and_incomplete_gates(tmp_path: Path):
    layout = Layout(tmp_path)
    first, second = _available()[:2]
    for criterion in PHASES[1].criteria:
        record_verdict(layout, first, GateVerdict(criterion.name, True, "ok"))
    names = [c.name for c in next(r for r in PHASES.values() if r.key == second).criteria]
    record_verdict(layout, second, GateVerdict(names[0], False, "too low: 0.8 < 0.9"))
    states = _states(layout)
    state, detail = states[first]
    assert state == "passed" and "no published bundle" in detail, "a passed gate without a bundle says so"
    assert states[second] == ("failed", f"gate failed: {names[0]}")
    # Only part of a gate evaluated: not a pass, and the missing criteria are named.
    third = Layout(tmp_path / "other")
    record_verdict(third, first, GateVerdict(PHASES[1].criteria[0].name, True, "ok"))
    state, detail = _states(third)[first]
    assert state == "not run" and PHASES[1].criteria[-1].name in detail


def test_a_failed_step_is_a_failed_phase(tmp_path: Path):
    layout = Layout(tmp_path)
    first = _available()[0]
    record_failure(layout, "checkpoint", first, "training diverged")
    assert _states(layout)[first] == ("failed", "step checkpoint failed")


def test_a_skipped_optional_phase_reads_skipped_with_its_reason(tmp_path: Path):
    optional = [r.key for r in PHASES.values() if r.optional and r.available and r.criteria]
    layout = Layout(tmp_path)
    for key in optional:
        skip_phase(layout, key, "no budget for F-SAM this round")
        assert _states(layout)[key] == ("skipped", "skipped on purpose: no budget for F-SAM this round")


def test_cli_table_has_a_state_column_and_exits_nonzero_without_a_bundle(tmp_path: Path, capsys):
    assert main(["summary", "--all", "--artifacts_root", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["phase", "state"]
    assert len(out) == 1 + len(PHASES)
    assert format_cell("test_fnr", 0.004219) == "0.42%" and format_cell("mcc", 0.95163) == "0.9516"
    assert format_cell("bundle_id", None) == "-"
    text = format_table([{"phase": "phase9", "state": "passed", "detail": "x"}])
    assert text.splitlines()[1].startswith("phase9  passed")


def test_a_verdict_on_an_asset_materialised_again_since_is_not_shown(tmp_path: Path, monkeypatch):
    import stage1_core.store as store

    layout = Layout(tmp_path)
    first, second = _available()[:2]
    names = [c.name for c in next(r for r in PHASES.values() if r.key == second).criteria]
    ids = {"id": "run-1"}
    monkeypatch.setattr(store, "record_path", lambda directory: tmp_path / "exists")
    (tmp_path / "exists").write_text("")

    class Record:
        @property
        def id(self):
            return ids["id"]

    monkeypatch.setattr(store, "read_record", lambda directory, asset, partition: Record())
    record_verdict(layout, second, GateVerdict(names[0], False, "too low: 0.8 < 0.9"))
    assert _states(layout)[second] == ("failed", f"gate failed: {names[0]}")
    assert store.read_verdicts(layout, second)[names[0]]["judged_id"] == "run-1"
    # The asset is materialised again and the run stops before the check: the old failure is gone.
    ids["id"] = "run-2"
    assert names[0] not in store.read_verdicts(layout, second)
    assert names[0] in store.read_verdicts(layout, second, current_only=False)
    assert _states(layout)[second][0] == "not run"


def test_an_optional_phase_that_failed_its_gate_and_was_skipped_reads_failed_skipped(tmp_path: Path):
    optional = [r for r in PHASES.values() if r.optional and r.available and r.criteria]
    layout = Layout(tmp_path)
    for recipe in optional:
        record_verdict(layout, recipe.key, GateVerdict(recipe.criteria[0].name, False, "gain CI [-0.1, +0.2] <= 0"))
        skip_phase(layout, recipe.key, "make demo: gate failed")
        state, detail = _states(layout)[recipe.key]
        assert state == "failed, skipped"
        assert recipe.criteria[0].name in detail and "skipped: make demo: gate failed" in detail
