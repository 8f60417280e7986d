"""The probability a miner serves: the head's, recalibrated at the deployment prior.

The subnet's validators draw labels 50/50 and read ``round(p)``; the head was trained at the
data's prior (NATIX: ~80-90% roadwork), so its 0.5 cut is not the best cut at 50/50. A logistic
map of the head's logit margin ``log p1 - log p0`` is fit on val_select's (deployment-view)
outputs with class weights that move the prior to ``prior`` (each class's total weight is
``prior`` resp. ``1 - prior``): ``p_served = sigmoid(a * margin + b)``. The map is strictly
increasing for ``a > 0``, so it never reorders images. It is fit on val_select, never on
val_calib: the certificate needs val_calib untouched. Every image gets a served probability,
exited or deferred; the exit decision is a latency hint for the miner's own cascade.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHOD = "logistic-margin-at-prior"
_EPS = 1e-12


def logit_margin(probs: np.ndarray) -> np.ndarray:
    """``log p1 - log p0`` of softmax probabilities ``[N, 2]`` (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    return np.log(p[:, 1]) - np.log(p[:, 0])


def prior_sample_weights(labels: np.ndarray, prior: float) -> np.ndarray:
    """Weights whose class totals are ``prior`` (class 1) and ``1 - prior`` (class 0), times N."""
    labels = np.asarray(labels, dtype=int)
    n1, n0 = int((labels == 1).sum()), int((labels == 0).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"the served-probability calibrator needs both classes ({n1} positives, {n0} negatives)")
    n = len(labels)
    return np.where(labels == 1, prior * n / n1, (1 - prior) * n / n0)


def fit_served_calibrator(probs: np.ndarray, labels: np.ndarray, prior: float = 0.5,
                          fit_split: str = "val_select") -> dict[str, Any]:
    """Fit ``sigmoid(a * margin + b)`` on ``(probs, labels)`` reweighted to ``prior``; a JSON-ready spec."""
    from sklearn.linear_model import LogisticRegression

    if fit_split == "val_calib":
        raise ValueError("the served-probability calibrator must not be fit on val_calib (the certificate's split)")
    labels = np.asarray(labels, dtype=int)
    margin = logit_margin(probs)
    model = LogisticRegression(C=1e6, max_iter=1000)
    model.fit(margin[:, None], labels, sample_weight=prior_sample_weights(labels, prior))
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if not a > 0:
        raise ValueError(f"the served-probability calibrator came out non-increasing (slope {a:.4g}): the head's "
                         f"scores do not separate the classes on {fit_split}")
    return {"method": METHOD, "a": a, "b": b, "prior": float(prior), "fit_split": fit_split,
            "n": int(len(labels)), "n_positive": int((labels == 1).sum())}


def served_probability(spec: dict[str, Any], probs: np.ndarray) -> np.ndarray:
    """``p_roadwork`` served for softmax probabilities ``[N, 2]`` under calibrator ``spec``."""
    if spec.get("method") != METHOD:
        raise ValueError(f"unknown served-probability calibrator method {spec.get('method')!r} (expected {METHOD!r})")
    z = float(spec["a"]) * logit_margin(probs) + float(spec["b"])
    return 1.0 / (1.0 + np.exp(-z))
