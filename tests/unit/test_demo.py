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
