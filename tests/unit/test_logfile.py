"""An artifact's own log file."""

from __future__ import annotations

import logging

import pytest

from stage1_core.logfile import artifact_log, log_figures


def test_records_of_stage1_core_loggers_inside_the_block_are_written_beside_the_artifact(tmp_path):
    inner = logging.getLogger("stage1_core.calibration.example")
    inner.info("before: not captured")
    handlers = list(logging.getLogger("stage1_core").handlers)
    with artifact_log(tmp_path / "a" / "step.log") as log:
        inner.info("threshold %.3f certified", 0.875)
        logging.getLogger("somebody.else").warning("not ours")
        log_figures(log, "softmax policy", {"coverage": 0.71, "path": tmp_path, "table": [1, 2]})
    text = (tmp_path / "a" / "step.log").read_text()
    assert "threshold 0.875 certified" in text and "softmax policy: coverage = 0.71" in text
    assert "before" not in text and "not ours" not in text and "table" not in text
    assert logging.getLogger("stage1_core").handlers == handlers  # the handler is removed again


def test_a_failing_step_still_leaves_its_log_with_the_error(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with artifact_log(tmp_path / "step.log") as log:
            log.info("fitting")
            1 / 0  # noqa: B018
    text = (tmp_path / "step.log").read_text()
    assert "fitting" in text and "failed: ZeroDivisionError" in text
