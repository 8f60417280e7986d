"""The demo driver's reading of Dagster's event log (step compute times for the overhead figure)."""

from __future__ import annotations

import pytest

from stage1_assets.demo import parse_duration, step_seconds

LOG = """2026-12-02 12:52:45 +0000 - dagster - DEBUG - job - run - 9305 - backbone - STEP_SUCCESS - Finished execution of step "backbone" in 2m5s.
2026-12-02 12:54:40 +0000 - dagster - DEBUG - job - run - 10121 - cached_features - STEP_SUCCESS - Finished execution of step "cached_features" in 1m29s.
2026-12-02 12:54:41 +0000 - dagster - DEBUG - job - run - 10122 - splits - STEP_SUCCESS - Finished execution of step "splits" in 288ms.
2026-12-02 12:54:55 +0000 - dagster - DEBUG - job - run - 10123 - checkpoint - STEP_SUCCESS - Finished execution of step "checkpoint" in 11.91s.
"""


def test_step_seconds_reads_minutes_and_seconds_together():
    seconds = step_seconds(LOG)
    assert seconds == pytest.approx({"backbone": 125.0, "cached_features": 89.0, "splits": 0.288, "checkpoint": 11.91})


@pytest.mark.parametrize("text, expected", [("828ms", 0.828), ("11.91s", 11.91), ("1m29s", 89.0), ("1h2m", 3720.0)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


def _fake_demo(monkeypatch, tmp_path, failing: set[str], gate_failed: set[str]):
    """Run ``demo.main`` with runs faked: ``failing`` phases exit 1, those in ``gate_failed`` on their gate."""
    import subprocess
    import types

    from stage1_assets import demo

    calls: list[tuple[str, str]] = []
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STAGE1_ARTIFACTS", str(tmp_path / "artifacts"))

    def run_phase(partition, log_dir):
        calls.append(("run", partition))
        return (1 if partition in failing else 0), 1.0, {}

    def fake_run(command, **kwargs):
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    def record_skip(partition, reason):
        from stage1_core.phase_state import skip_phase

        calls.append(("skip", partition))
        skip_phase(tmp_path / "artifacts", partition, demo.DEMO_SKIP + reason)
        return 0

    monkeypatch.setattr(demo, "run_phase", run_phase)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(demo, "record_demo_skip", record_skip)
    monkeypatch.setattr(demo, "gate_failure_reason",
                        lambda partition: "improves_over_adamw: CI [-4e-4, 4e-4]" if partition in gate_failed else None)
    return demo, calls


def test_demo_skips_an_optional_phase_that_fails_its_gate_and_goes_on(monkeypatch, tmp_path):
    from stage1_core.phases import PHASES

    optional = [r.key for r in PHASES.values() if r.optional and r.available]
    available = [r.key for r in PHASES.values() if r.available]
    demo, calls = _fake_demo(monkeypatch, tmp_path, set(optional), set(optional))
    assert demo.main([]) == 0
    assert [p for kind, p in calls if kind == "run"] == available
    assert [p for kind, p in calls if kind == "skip"] == optional
    # A second demo retries the phase the first one skipped (its skip is removed first).
    calls.clear()
    demo, calls = _fake_demo(monkeypatch, tmp_path, set(), set())
    assert demo.main([]) == 0
    assert [p for kind, p in calls if kind == "run"] == available
    from stage1_core.phase_state import read_skip

    assert all(read_skip(tmp_path / "artifacts", key) is None for key in optional)


def test_demo_stops_when_an_optional_phase_fails_a_step_or_a_required_phase_fails(monkeypatch, tmp_path):
    from stage1_core.phases import PHASES

    optional = [r.key for r in PHASES.values() if r.optional and r.available]
    required = [r.key for r in PHASES.values() if r.available and not r.optional]
    demo, calls = _fake_demo(monkeypatch, tmp_path, {optional[0]}, set())
    assert demo.main([]) == 1
    assert calls[-1] == ("run", optional[0]) and not any(kind == "skip" for kind, _ in calls)
    demo, calls = _fake_demo(monkeypatch, tmp_path / "b", {required[1]}, {required[1]})
    assert demo.main([]) == 1
    assert calls[-1] == ("run", required[1]) and not any(kind == "skip" for kind, _ in calls)


def test_demo_does_not_run_a_phase_a_person_skipped(monkeypatch, tmp_path):
    from stage1_core.phase_state import skip_phase
    from stage1_core.phases import PHASES

    optional = [r.key for r in PHASES.values() if r.optional and r.available]
    for key in optional:
        skip_phase(tmp_path / "artifacts", key, "no GPU budget this week")
    demo, calls = _fake_demo(monkeypatch, tmp_path, set(), set())
    assert demo.main([]) == 0
    assert not any(p in optional for _, p in calls)


def test_gate_failure_is_read_from_the_verdicts_and_the_skip_goes_through_the_dagster_job(monkeypatch, tmp_path):
    from stage1_assets import demo
    from stage1_core.acceptance.verdicts import record_verdict
    from stage1_core.gates import GateVerdict
    from stage1_core.phase_state import read_skip
    from stage1_core.phases import PHASES
    from stage1_core.steps.context import Layout

    recipe = next(r for r in PHASES.values() if r.optional and r.available)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STAGE1_ARTIFACTS", str(tmp_path / "artifacts"))
    (tmp_path / "home").mkdir()
    assert demo.gate_failure_reason(recipe.key) is None, "nothing judged yet: not a gate failure"
    layout = Layout(tmp_path / "artifacts")
    for criterion in recipe.criteria:
        record_verdict(layout, recipe.key, GateVerdict(criterion.name, criterion is not recipe.criteria[0], "figures"))
    reason = demo.gate_failure_reason(recipe.key)
    assert reason == f"{recipe.criteria[0].name}: figures"
    assert demo.record_demo_skip(recipe.key, reason) == 0
    record = read_skip(layout, recipe.key)
    assert record["reason"] == demo.DEMO_SKIP + reason and record["by"].startswith("dagster run ")
