"""The per-epoch CSV log: the baseline's header and number formats first, extra columns after.

Baseline columns (percentages as the baseline wrote them)::

    Epoch,Train_Loss,Train_Acc,Val_Loss,Val_Acc,ECE,Exit_Coverage,Exit_Acc,Best_Val_Acc,LR

``Exit_Coverage`` / ``Exit_Acc`` use ``legacy_exit_threshold_for_logging`` (monitoring only; the
deployed exit policy is certified later on val_calib). ``Exit_Acc`` is ``nan`` when nothing
exits (the baseline wrote 0.00, which reads like a real accuracy). ``Best_Val_Acc`` includes the
current epoch (the baseline wrote it before updating). Extra columns: selective metrics on
val_select (``AUGRC``, ``AURC``, ``Risk@0.5`` ... ``Coverage@0.01`` ..., raw values in [0, 1]) and
``Epoch_Seconds``; for gated heads ``GateCoverage`` / ``GateAcc`` after the baseline columns, then
``Certified_Coverage`` (coverage certified on val_select at target_fnr_exit, a fraction).
Once the phase's exit policy is evaluated, :func:`complete_log` writes a copy whose last row
carries FNR on exited samples and coverage with their intervals. The file is rewritten
atomically from the full history after every epoch, so a resumed run continues the same file
without duplicate rows.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stage1_core.artifacts import atomic_write_text

BASELINE_HEADER = (
    "Epoch",
    "Train_Loss",
    "Train_Acc",
    "Val_Loss",
    "Val_Acc",
    "ECE",
    "Exit_Coverage",
    "Exit_Acc",
    "Best_Val_Acc",
    "LR",
)
# column -> (history key, scale, format)
BASELINE_FORMATS: dict[str, tuple[str, float, str]] = {
    "Epoch": ("epoch", 1.0, "d"),
    "Train_Loss": ("train_loss", 1.0, ".4f"),
    "Train_Acc": ("train_acc", 100.0, ".2f"),
    "Val_Loss": ("val_loss", 1.0, ".4f"),
    "Val_Acc": ("val_acc", 100.0, ".2f"),
    "ECE": ("ece", 1.0, ".4f"),
    "Exit_Coverage": ("exit_coverage", 100.0, ".1f"),
    "Exit_Acc": ("exit_acc", 100.0, ".2f"),
    "Best_Val_Acc": ("best_val_acc", 100.0, ".2f"),
    "LR": ("lr", 1.0, ".2e"),
}
SELECTIVE_PREFIX = "sel_"
#: Gated heads (phase 3+): the raw gate's acceptance on val_select (sigmoid(gate) >= 0.5) and the
#: class head's accuracy on what it accepts - monitoring only, like Exit_Coverage / Exit_Acc.
GATE_FORMATS: dict[str, tuple[str, float, str]] = {
    "GateCoverage": ("gate_coverage", 100.0, ".1f"),
    "GateAcc": ("gate_acc", 100.0, ".2f"),
}
#: Coverage the exit score certifies on val_select at target_fnr_exit (the ``certified_coverage``
#: selection metric; a fraction, the certificate proper is made later on val_calib).
OPERATING_POINT_FORMATS: dict[str, tuple[str, float, str]] = {
    "Certified_Coverage": ("certified_coverage", 1.0, ".6f"),
}
#: The phase's certified exit policy on val_test, filled on the last epoch's row once it is
#: evaluated (:func:`complete_log`): FNR on exited samples and coverage with their percentile-
#: bootstrap intervals, plus the one-sided Clopper-Pearson bound the certificate is judged by.
POLICY_COLUMNS = (
    "Exit_Policy", "FNR_on_exited", "FNR_CI_Lower", "FNR_CI_Upper", "FNR_CP_Upper",
    "Policy_Coverage", "Policy_Coverage_CI_Lower", "Policy_Coverage_CI_Upper",
)


def selective_column(key: str) -> str:
    """Column name of a ``selective_metrics`` key: ``augrc`` -> ``AUGRC``, ``risk@0.8`` -> ``Risk@0.8``."""
    if key in ("augrc", "aurc"):
        return key.upper()
    head, _, level = key.partition("@")
    return f"{head.capitalize()}@{level}" if level else key


def _fmt(value: Any, scale: float, spec: str) -> str:
    if value is None:
        return "nan"
    if spec == "d":
        return str(int(value))
    value = float(value) * scale
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def columns(record: Mapping[str, Any]) -> list[str]:
    """Header for a history record: baseline columns, gate columns (gated heads), selective
    metrics, Epoch_Seconds."""
    gate = [column for column, (key, _, _) in {**GATE_FORMATS, **OPERATING_POINT_FORMATS}.items() if key in record]
    extra = [selective_column(k[len(SELECTIVE_PREFIX):]) for k in record if k.startswith(SELECTIVE_PREFIX)]
    return [*BASELINE_HEADER, *gate, *extra, "Epoch_Seconds"]


def format_row(record: Mapping[str, Any]) -> list[str]:
    """CSV cells of one history record, in :func:`columns` order."""
    cells = [_fmt(record.get(key), scale, spec) for key, scale, spec in BASELINE_FORMATS.values()]
    cells += [_fmt(record[key], scale, spec) for key, scale, spec in (*GATE_FORMATS.values(), *OPERATING_POINT_FORMATS.values())
              if key in record]
    cells += [_fmt(v, 1.0, ".6f") for k, v in record.items() if k.startswith(SELECTIVE_PREFIX)]
    cells.append(_fmt(record.get("epoch_seconds"), 1.0, ".1f"))
    return cells


def write_log(path: str | Path, history: Sequence[Mapping[str, Any]]) -> Path:
    """Write the whole log (header + one row per epoch) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns(history[0]) if history else list(BASELINE_HEADER))
    for record in history:
        writer.writerow(format_row(record))
    return atomic_write_text(path, buffer.getvalue())


def complete_log(log_csv: str | Path, out_path: str | Path, policy: str, figures: Mapping[str, Any]) -> Path:
    """Copy the training log to ``out_path`` with the :data:`POLICY_COLUMNS` filled on its last row.

    ``figures`` holds ``fnr_on_exited``, ``fnr_ci`` (lower, upper), ``fnr_cp_upper``,
    ``coverage`` and ``coverage_ci`` (lower, upper) of the phase's certified policy on val_test;
    None or NaN is written ``nan`` (e.g. no exited positive). Earlier rows get ``nan``: the
    policy exists only once training has ended.
    """
    with open(log_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise ValueError(f"{log_csv}: no epoch row to complete (header only or empty)")
    header = [c for c in rows[0] if c not in POLICY_COLUMNS]
    keep = [i for i, c in enumerate(rows[0]) if c not in POLICY_COLUMNS]
    fnr_lo, fnr_hi = figures.get("fnr_ci") or (None, None)
    cov_lo, cov_hi = figures.get("coverage_ci") or (None, None)
    values = [figures.get("fnr_on_exited"), fnr_lo, fnr_hi, figures.get("fnr_cp_upper"),
              figures.get("coverage"), cov_lo, cov_hi]
    last = [str(policy), *(_fmt(v, 1.0, ".6f") for v in values)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*header, *POLICY_COLUMNS])
    for n, row in enumerate(rows[1:], start=1):
        cells = [row[i] for i in keep]
        writer.writerow([*cells, *(last if n == len(rows) - 1 else ["", *["nan"] * (len(POLICY_COLUMNS) - 1)])])
    return atomic_write_text(out_path, buffer.getvalue())
