"""Reference accuracies the phase-1 gate compares the trained head with."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stage1_core.training.logging_csv import BASELINE_HEADER


def class_weights(labels: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """The baseline's class weights ``total / (k * count + 1e-6)``."""
    labels = np.asarray(labels).astype(int)
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return len(labels) / (n_classes * counts + 1e-6)


def logistic_probe_predictions(
    train_x: np.ndarray,
    train_y: np.ndarray,
    x: np.ndarray,
    seed: int = 0,
    class_weighting: str = "balanced",
) -> np.ndarray:
    """Class predictions on ``x`` of a logistic regression on standardised features, weighted like the head.

    Same features and the head's class weighting: when the MLP head cannot match this probe,
    the trainer (not the data) is at fault.
    """
    weights = class_weights(train_y)
    class_weight = {0: weights[0], 1: weights[1]} if class_weighting == "balanced" else None
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight=class_weight, max_iter=5000, random_state=seed),
    )
    probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y).astype(int))
    return probe.predict(np.asarray(x, dtype=np.float64)).astype(int)


def logistic_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    seed: int = 0,
    class_weighting: str = "balanced",
) -> float:
    """Accuracy on ``(val_x, val_y)`` of :func:`logistic_probe_predictions`."""
    predictions = logistic_probe_predictions(train_x, train_y, val_x, seed=seed, class_weighting=class_weighting)
    return float((predictions == np.asarray(val_y).astype(int)).mean())


def read_baseline_log(path: str | Path) -> dict[str, Any]:
    """Best validation accuracy in a CSV log of the old script.

    The old script wrote ``Best_Val_Acc`` *before* updating it, so the last row can miss the
    final epoch's improvement: the best is ``max(Best_Val_Acc, Val_Acc)`` over all rows.
    Raises ``ValueError`` naming the file and line of anything that is not such a log.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: log file not found")
    rows: list[dict[str, str]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            cells = [c.strip() for c in row]
            if cells[: len(BASELINE_HEADER)] == list(BASELINE_HEADER):
                header = cells
                continue
            if header is None:
                raise ValueError(
                    f"{path}:{reader.line_num}: expected the header {','.join(BASELINE_HEADER)} of the old "
                    f"script's log before any data row"
                )
            if len(cells) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: {len(cells)} fields, the header has {len(header)}")
            rows.append({**dict(zip(header, cells)), "_line": str(reader.line_num)})
    if not rows:
        raise ValueError(f"{path}: no epoch rows (only a header, or an empty file)")
    best, best_epoch = -1.0, 0
    for row in rows:
        try:
            val_acc, best_col, epoch = float(row["Val_Acc"]), float(row["Best_Val_Acc"]), int(row["Epoch"])
        except ValueError:
            raise ValueError(f"{path}:{row['_line']}: Epoch/Val_Acc/Best_Val_Acc are not numbers: {row}") from None
        if val_acc > best:
            best, best_epoch = val_acc, epoch
        if best_col > best:
            best, best_epoch = best_col, 0
    if not 0.0 <= best <= 100.0:
        raise ValueError(f"{path}: best validation accuracy {best} is not a percentage in [0, 100]")
    return {
        "log_file": str(path),
        "epochs": len(rows),
        "best_val_acc_percent": best,
        "best_epoch": best_epoch,
        "last_best_val_acc_column": float(rows[-1]["Best_Val_Acc"]),
        "baseline_val_accuracy": round(best / 100.0, 6),
    }
