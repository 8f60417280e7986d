"""Calibration of the gate head's raw logit into a score in [0, 1] (phase 3).

:class:`GateCalibrator` maps a raw gate logit z to an estimate of P(event | z) with one of

``"platt"``
    s = sigmoid(a z + b), fitted by minimising the cross-entropy against Platt's smoothed
    targets t+ = (N+ + 1) / (N+ + 2), t- = 1 / (N- + 2) with ``scipy.optimize`` (L-BFGS-B on the
    two parameters, analytic gradient). scikit-learn's ``LogisticRegression`` takes no soft
    targets, so it is not used. The slope is bounded to a >= 0: the map stays monotone
    non-decreasing, so it never reverses the gate's order (an anti-informative gate gets a = 0,
    one constant score).
``"isotonic"``
    ``sklearn.isotonic.IsotonicRegression(out_of_bounds="clip", increasing=True)`` on z; its
    ``X_thresholds_`` / ``y_thresholds_`` are kept as plain lists and prediction is
    ``np.interp`` over them (identical to scikit-learn's ``predict``). It is constant within
    fitted blocks, so calibrated scores tie.
``"none"``
    s = sigmoid(z).

The event (``event=``) is what the score should estimate:

``"correct"`` (default)
    the head's prediction is right, y == argmax(p) - the gate's training reading and the
    quantity exit accuracy measures.
``"not_false_negative"``
    the exited prediction is not a false negative, i.e. not (y = 1 and argmax(p) = 0) - exactly
    the event the FNR certificate counts; every positive prediction is a success.

Fit the calibrator on one labelled split (val_calib, or a split disjoint from it: see
:func:`stage1_core.policies.gate.fit_gate_policy` for which one keeps the certificate valid).
Parameters are stored as plain numbers (:meth:`GateCalibrator.to_dict`), never pickles.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from ..metrics.calibration import compute_ece

__all__ = [
    "CALIBRATOR_METHODS",
    "GATE_EVENTS",
    "GateCalibrator",
    "gate_events",
    "gate_auroc",
    "score_ece",
    "gate_calibration_metrics",
]

CALIBRATOR_METHODS: tuple[str, ...] = ("platt", "isotonic", "none")
GATE_EVENTS: tuple[str, ...] = ("correct", "not_false_negative")


def _as_raw(values, name: str = "raw gate logits") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _as_binary(values, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {arr.shape}")
    if not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must be binary (0/1 or bool)")
    return arr.astype(np.int64)


def gate_events(predictions, labels, event: str = "correct") -> np.ndarray:
    """Binary target of the gate calibrator for hard ``predictions`` and ``labels`` (see module docstring)."""
    pred = np.asarray(predictions).reshape(-1).astype(np.int64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if pred.shape != y.shape:
        raise ValueError(f"predictions has {pred.shape[0]} entries, labels {y.shape[0]}")
    if event == "correct":
        return (pred == y).astype(np.int64)
    if event == "not_false_negative":
        return (~((y == 1) & (pred == 0))).astype(np.int64)
    raise ValueError(f"unknown gate event {event!r}; choose one of {GATE_EVENTS}")


def _platt_fit(z: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the cross-entropy of sigmoid(a z + b) against Platt's smoothed targets."""
    n_pos = int(target.sum())
    n_neg = int(target.shape[0] - n_pos)
    t = np.where(target == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        u = params[0] * z + params[1]
        # t * softplus(-u) + (1 - t) * softplus(u) = softplus(u) - t * u
        value = float(np.sum(np.logaddexp(0.0, u) - t * u))
        r = special.expit(u) - t
        return value, np.array([float(np.dot(r, z)), float(r.sum())])

    res = optimize.minimize(
        loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
        bounds=[(0.0, None), (None, None)], options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15},
    )
    a, b = (float(v) for v in res.x)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"Platt fit did not converge to finite parameters ({res.message})")
    return a, b


class GateCalibrator:
    """Raw gate logit -> calibrated score in [0, 1] (``fit`` / ``predict``, scikit-learn style)."""

    def __init__(self, method: str = "platt", event: str = "correct") -> None:
        if method not in CALIBRATOR_METHODS:
            raise ValueError(f"unknown gate calibrator {method!r}; choose one of {CALIBRATOR_METHODS}")
        if event not in GATE_EVENTS:
            raise ValueError(f"unknown gate event {event!r}; choose one of {GATE_EVENTS}")
        self.method = method
        self.event = event
        self.params: dict[str, Any] | None = {} if method == "none" else None
        self.n_fit = 0

    @property
    def is_fitted(self) -> bool:
        return self.params is not None

    def fit(self, raw, target) -> "GateCalibrator":
        """Fit on raw gate logits ``raw`` [N] and the binary event ``target`` [N] (see :func:`gate_events`)."""
        z = _as_raw(raw)
        if z.shape[0] == 0:
            raise ValueError("cannot fit a gate calibrator on an empty set")
        y = _as_binary(target, z.shape[0], "target")
        if self.method == "platt":
            a, b = _platt_fit(z, y)
            self.params = {"a": a, "b": b}
        elif self.method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(out_of_bounds="clip", increasing=True, y_min=0.0, y_max=1.0).fit(z, y)
            self.params = {
                "x_thresholds": [float(v) for v in iso.X_thresholds_],
                "y_thresholds": [float(v) for v in iso.y_thresholds_],
            }
        else:
            self.params = {}
        self.n_fit = int(z.shape[0])
        return self

    def predict(self, raw) -> np.ndarray:
        """Calibrated score in [0, 1] for each raw gate logit."""
        if self.params is None:
            raise ValueError(f"the {self.method} gate calibrator is not fitted: call fit() or from_dict()")
        z = _as_raw(raw)
        if self.method == "platt":
            return special.expit(self.params["a"] * z + self.params["b"])
        if self.method == "isotonic":
            return np.interp(z, self.params["x_thresholds"], self.params["y_thresholds"])
        return special.expit(z)

    def to_dict(self) -> dict[str, Any]:
        """Plain-number description: ``method``, ``event``, ``params``, ``n_fit``."""
        if self.params is None:
            raise ValueError(f"the {self.method} gate calibrator is not fitted: nothing to save")
        params = {k: (list(v) if isinstance(v, list) else v) for k, v in self.params.items()}
        return {"method": self.method, "event": self.event, "params": params, "n_fit": self.n_fit}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateCalibrator":
        """Rebuild a fitted calibrator from :meth:`to_dict` output (parameters are checked)."""
        cal = cls(data.get("method", ""), data.get("event", "correct"))
        params = data.get("params")
        if not isinstance(params, dict):
            raise ValueError("gate calibrator data has no 'params' object")
        if cal.method == "platt":
            try:
                a, b = float(params["a"]), float(params["b"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"Platt gate calibrator needs numbers 'a' and 'b', got {params!r}") from exc
            if not (math.isfinite(a) and math.isfinite(b) and a >= 0.0):
                raise ValueError(f"Platt gate calibrator needs finite a >= 0 and finite b, got a={a!r}, b={b!r}")
            cal.params = {"a": a, "b": b}
        elif cal.method == "isotonic":
            try:
                xs = [float(v) for v in params["x_thresholds"]]
                ys = [float(v) for v in params["y_thresholds"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError("isotonic gate calibrator needs lists 'x_thresholds' and 'y_thresholds'") from exc
            x_arr, y_arr = np.asarray(xs), np.asarray(ys)
            if (
                not xs
                or len(xs) != len(ys)
                or not (np.all(np.isfinite(x_arr)) and np.all(np.isfinite(y_arr)))
                or np.any(np.diff(x_arr) < 0)
                or np.any(np.diff(y_arr) < 0)
                or y_arr.min() < 0.0
                or y_arr.max() > 1.0
            ):
                raise ValueError(
                    "isotonic gate calibrator thresholds must be equally long, non-empty, finite, "
                    "non-decreasing, with y in [0, 1]"
                )
            cal.params = {"x_thresholds": xs, "y_thresholds": ys}
        else:
            cal.params = {}
        cal.n_fit = int(data.get("n_fit", 0))
        return cal

    def __repr__(self) -> str:
        return f"GateCalibrator(method={self.method!r}, event={self.event!r}, fitted={self.is_fitted})"


def gate_auroc(scores, events) -> float | None:
    """AUROC of ``scores`` separating event 1 from event 0 (ties count 1/2); None with one class only."""
    s = _as_raw(scores, "scores")
    e = _as_binary(events, s.shape[0], "events")
    n1 = int(e.sum())
    n0 = int(e.shape[0] - n1)
    if n1 == 0 or n0 == 0:
        return None
    ranks = stats.rankdata(s, method="average")
    return float((ranks[e == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def score_ece(scores, events, n_bins: int = 10) -> float:
    """Baseline ECE of a score for a binary event: :func:`compute_ece` on probabilities ``[1 - s, s]``."""
    s = _as_raw(scores, "scores")
    if s.shape[0] == 0:
        raise ValueError("scores is empty: need at least one sample")
    if np.any(s < 0.0) or np.any(s > 1.0):
        raise ValueError("scores must lie in [0, 1] (calibrate or apply a sigmoid first)")
    e = _as_binary(events, s.shape[0], "events")
    return compute_ece(np.stack([1.0 - s, s], axis=1), e, n_bins)


def gate_calibration_metrics(raw, calibrator: GateCalibrator, predictions, labels, n_bins: int = 10) -> dict[str, Any]:
    """AUROC (raw logit and calibrated score: isotonic ties lower the latter) for the calibrator's
    event, and the ECE of sigmoid(raw) and of the calibrated score."""
    z = _as_raw(raw)
    events = gate_events(predictions, labels, calibrator.event)
    if events.shape[0] != z.shape[0]:
        raise ValueError(f"raw gate logits have {z.shape[0]} entries, labels {events.shape[0]}")
    calibrated = calibrator.predict(z)
    return {
        "event": calibrator.event,
        "event_rate": float(events.mean()),
        "n": int(z.shape[0]),
        "gate_auroc_raw": gate_auroc(z, events),
        "gate_auroc_calibrated": gate_auroc(calibrated, events),
        "ece_raw_sigmoid": score_ece(special.expit(z), events, n_bins),
        "ece_calibrated": score_ece(calibrated, events, n_bins),
    }
