"""Shared input checks for the metric functions: clear errors instead of silent broadcasting."""

from __future__ import annotations

import numpy as np


def as_probs(probs, name: str = "probs", allow_empty: bool = False) -> np.ndarray:
    """``probs`` as a float64 [N, C] array of probabilities (rows sum to 1 within 1e-4)."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"{name} must have shape [N, C] with C >= 2, got {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: need at least one sample")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name} must hold finite probabilities in [0, 1]")
    if not np.allclose(arr.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(f"{name} rows must sum to 1 (pass softmax outputs, not logits)")
    return arr


def as_labels(labels, n: int | None = None, n_classes: int = 2, name: str = "labels") -> np.ndarray:
    """``labels`` as an int64 [N] array with values in ``0..n_classes-1``."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but probs have {n} rows")
    if arr.size and (not np.all(np.equal(np.mod(arr, 1), 0)) or arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} must be integers in 0..{n_classes - 1}")
    return arr.astype(np.int64)


def as_mask(mask, n: int, name: str) -> np.ndarray:
    """``mask`` as a bool [N] array."""
    arr = np.asarray(mask)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name} must be boolean (or 0/1)")
        arr = arr.astype(bool)
    return arr


def as_scores(values, name: str, n: int | None = None) -> np.ndarray:
    """``values`` as a finite float64 [N] array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr
