"""Reference accuracies the phase-1 gate compares the trained head with."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def class_weights(labels: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """The baseline's class weights ``total / (k * count + 1e-6)``."""
    labels = np.asarray(labels).astype(int)
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return len(labels) / (n_classes * counts + 1e-6)


def logistic_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int = 0
) -> float:
    """val accuracy of a class-weighted logistic regression on standardised features.

    Same features and the head's class weights: when the MLP head cannot match this probe within
    a point, the trainer (not the data) is at fault.
    """
    weights = class_weights(train_y)
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight={0: weights[0], 1: weights[1]}, max_iter=5000, random_state=seed),
    )
    probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y).astype(int))
    return float((probe.predict(np.asarray(val_x, dtype=np.float64)) == np.asarray(val_y).astype(int)).mean())


def read_baseline_log(path: str | Path) -> dict[str, float | int]:
    """Best_Val_Acc of the old script's CSV training log (``Epoch,...,Best_Val_Acc,LR``).

    Returns the best accuracy as a fraction (the old log may hold a percentage) and the epoch count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training log not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "Best_Val_Acc" not in reader.fieldnames:
            raise ValueError(
                f"{path}:1: no Best_Val_Acc column (found {reader.fieldnames}); expected the CSV log written by "
                f"train_stage1_head.py (header Epoch,Train_Loss,...,Best_Val_Acc,LR)"
            )
        values = []
        for line, row in enumerate(reader, start=2):
            try:
                values.append(float(row["Best_Val_Acc"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: Best_Val_Acc={row['Best_Val_Acc']!r} is not a number") from None
    if not values:
        raise ValueError(f"{path}: the log has a header but no epoch rows")
    best = max(values)
    fraction = best / 100.0 if best > 1.0 else best
    return {"best_val_accuracy": fraction, "epochs": len(values), "raw_best": best}
