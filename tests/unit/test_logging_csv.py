"""The training CSV log: baseline header first, gate columns, the policy's figures at the end."""

from __future__ import annotations

import csv
import math

import pytest

from stage1_core.training.logging_csv import BASELINE_HEADER, POLICY_COLUMNS, complete_log, write_log


def _record(epoch: int, gated: bool) -> dict:
    record = {"epoch": epoch, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.85, "ece": 0.03,
              "exit_coverage": 0.6, "exit_acc": 0.97, "best_val_acc": 0.85, "lr": 1e-4,
              "sel_augrc": 0.02, "epoch_seconds": 1.5}
    if gated:
        record.update(gate_coverage=0.7, gate_acc=None if epoch == 1 else 0.955)
    return record


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("gated", [False, True])
def test_gate_columns_follow_the_baseline_columns_for_gated_heads_only(tmp_path, gated):
    header, first, second = _read(write_log(tmp_path / "log.csv", [_record(1, gated), _record(2, gated)]))
    assert tuple(header[: len(BASELINE_HEADER)]) == BASELINE_HEADER
    assert ("GateCoverage" in header) == gated and header[-1] == "Epoch_Seconds"
    if gated:
        assert header[len(BASELINE_HEADER):len(BASELINE_HEADER) + 2] == ["GateCoverage", "GateAcc"]
        assert first[header.index("GateCoverage")] == "70.0" and first[header.index("GateAcc")] == "nan"
        assert second[header.index("GateAcc")] == "95.50"
    assert len(first) == len(second) == len(header)


def test_complete_log_fills_the_policy_figures_on_the_last_row_only(tmp_path):
    log = write_log(tmp_path / "log.csv", [_record(1, True), _record(2, True), _record(3, True)])
    figures = {"fnr_on_exited": 0.0125, "fnr_ci": (0.004, 0.023), "fnr_cp_upper": 0.031,
               "coverage": 0.71, "coverage_ci": (0.68, math.nan)}
    out = complete_log(log, tmp_path / "eval" / "training_log.csv", "gate", figures)
    original, completed = _read(log), _read(out)
    header = completed[0]
    assert header == [*original[0], *POLICY_COLUMNS]
    assert [row[: len(original[0])] for row in completed[1:]] == original[1:]  # the training rows are unchanged
    last = dict(zip(header, completed[-1]))
    assert last["Exit_Policy"] == "gate" and float(last["FNR_on_exited"]) == 0.0125
    assert (float(last["FNR_CI_Lower"]), float(last["FNR_CI_Upper"]), float(last["FNR_CP_Upper"])) == (0.004, 0.023, 0.031)
    assert float(last["Policy_Coverage"]) == 0.71 and last["Policy_Coverage_CI_Upper"] == "nan"
    for row in completed[1:-1]:
        assert row[header.index("Exit_Policy")] == "" and row[header.index("FNR_on_exited")] == "nan"
    # Completing a completed log replaces the figures instead of adding columns twice.
    again = _read(complete_log(out, tmp_path / "again.csv", "softmax", {**figures, "fnr_on_exited": None}))
    assert again[0] == header and dict(zip(header, again[-1]))["FNR_on_exited"] == "nan"
    with pytest.raises(ValueError, match="no epoch row"):
        complete_log(write_log(tmp_path / "empty.csv", []), tmp_path / "x.csv", "softmax", figures)
