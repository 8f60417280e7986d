"""Classification metrics the subnet pays for: accuracy, balanced accuracy, MCC.

Arguments follow scikit-learn's order, ``(labels, preds)``. All are defined on degenerate
inputs: balanced accuracy averages the recall of the classes present in ``labels``; MCC is 0
when a row or column of the confusion matrix is empty (scikit-learn's convention).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix

from ._inputs import as_labels

__all__ = ["accuracy", "balanced_accuracy", "mcc"]


def _pair(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    y = as_labels(labels)
    if y.size == 0:
        raise ValueError("classification metrics need at least one sample")
    return y, as_labels(preds, n=y.shape[0], name="preds")


def accuracy(labels, preds) -> float:
    """Fraction of predictions equal to the label."""
    y, p = _pair(labels, preds)
    return float(accuracy_score(y, p))


def balanced_accuracy(labels, preds) -> float:
    """Mean recall over the classes present in ``labels``."""
    y, p = _pair(labels, preds)
    cm = confusion_matrix(y, p, labels=[0, 1])
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def mcc(labels, preds) -> float:
    """Matthews correlation coefficient (0 when undefined).

    scikit-learn's covariance formula on the full 2 x 2 confusion matrix, so a set with a
    single class gives 0 without a warning.
    """
    y, p = _pair(labels, preds)
    cm = confusion_matrix(y, p, labels=[0, 1]).astype(np.float64)
    t_sum, p_sum = cm.sum(axis=1), cm.sum(axis=0)
    n, correct = cm.sum(), np.trace(cm)
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))
