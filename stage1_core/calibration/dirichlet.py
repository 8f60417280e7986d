"""Dirichlet calibration of softmax outputs (Kull et al., NeurIPS 2019), fit with scipy.

The calibrated probabilities are ``q = softmax(W ln p + b)`` with ``W`` [k, k] and ``b`` [k]; ``p``
is clipped to ``[1e-12, 1]`` before the log. The fit minimises

    mean_i -ln q_{y_i}(x_i)  +  lambda / (k (k - 1)) * sum_{i != j} W_ij^2  +  mu / k * sum_j b_j^2

(ODIR: only off-diagonal weights and the biases are penalised). The normalisation by ``k(k-1)``
and ``k`` follows the paper and is what ``normalise=True`` (the default) does; ``normalise=False``
uses the raw sums (the ``dirichletcal`` package's default). The data term is the *mean* NLL, so
the penalty strengths do not scale with the calibration-set size.

Optimiser: L-BFGS-B with the analytic gradient, started at the identity map (``W = I``, ``b = 0``,
i.e. ``q = p``), so an unhelpful fit stays close to the uncalibrated model. For two classes and
``lambda = mu = 0`` the model is logistic regression on ``[ln p0, ln p1]`` with an intercept (the
softmax only sees ``W_1 - W_0`` and ``b_1 - b_0``), which is beta calibration. Parameters
serialise to plain JSON numbers (:meth:`DirichletCalibrator.to_dict`), never pickles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from ..metrics._inputs import as_labels, as_probs

__all__ = ["DirichletCalibrator", "PROB_FLOOR"]

PROB_FLOOR = 1e-12


def _log_features(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, PROB_FLOOR, 1.0))


class DirichletCalibrator:
    """Scikit-learn style Dirichlet calibrator with ODIR regularisation.

    ``fit(probs, labels)`` learns ``W`` and ``b`` (attributes ``coef_`` and ``intercept_``);
    ``predict_proba(probs)`` returns calibrated probabilities of the same shape.
    """

    def __init__(
        self,
        reg_lambda: float = 1e-3,
        reg_mu: float = 1e-3,
        max_iter: int = 300,
        normalise: bool = True,
        tol: float = 1e-10,
    ):
        self.reg_lambda = float(reg_lambda)
        self.reg_mu = float(reg_mu)
        self.max_iter = int(max_iter)
        self.normalise = bool(normalise)
        self.tol = float(tol)
        if self.reg_lambda < 0 or self.reg_mu < 0:
            raise ValueError(f"reg_lambda and reg_mu must be >= 0, got {reg_lambda!r}, {reg_mu!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
        self.coef_: np.ndarray | None = None
        self.intercept_: np.ndarray | None = None
        self.n_iter_: int = 0
        self.converged_: bool = False

    def _penalty_weights(self, k: int) -> tuple[float, float]:
        if not self.normalise:
            return self.reg_lambda, self.reg_mu
        return self.reg_lambda / (k * (k - 1)), self.reg_mu / k

    def _objective(self, theta: np.ndarray, feats: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
        n, k = onehot.shape
        w = theta[: k * k].reshape(k, k)
        b = theta[k * k :]
        logits = feats @ w.T + b
        logq = log_softmax(logits, axis=1)
        nll = -float(np.sum(onehot * logq)) / n
        dlogits = (np.exp(logq) - onehot) / n
        grad_w = dlogits.T @ feats
        grad_b = dlogits.sum(axis=0)
        lam, mu = self._penalty_weights(k)
        off = w * (1.0 - np.eye(k))
        loss = nll + lam * float(np.sum(off**2)) + mu * float(np.sum(b**2))
        grad_w = grad_w + 2.0 * lam * off
        grad_b = grad_b + 2.0 * mu * b
        return loss, np.concatenate([grad_w.ravel(), grad_b])

    def fit(self, probs, labels) -> "DirichletCalibrator":
        """Fit ``W`` and ``b`` on softmax outputs ``probs`` [N, k] and integer ``labels`` [N]."""
        p = as_probs(probs)
        k = p.shape[1]
        y = as_labels(labels, n=p.shape[0], n_classes=k)
        feats = _log_features(p)
        onehot = np.eye(k)[y]
        theta0 = np.concatenate([np.eye(k).ravel(), np.zeros(k)])
        res = minimize(
            self._objective,
            theta0,
            args=(feats, onehot),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": self.tol * 1e-3},
        )
        self.coef_ = res.x[: k * k].reshape(k, k).copy()
        self.intercept_ = res.x[k * k :].copy()
        self.n_iter_ = int(res.nit)
        self.converged_ = bool(res.success)
        return self

    def _check_fitted(self) -> None:
        if self.coef_ is None or self.intercept_ is None:
            raise RuntimeError("DirichletCalibrator is not fitted: call fit() or from_dict() first")

    def decision_function(self, probs) -> np.ndarray:
        """Calibrated logits ``W ln p + b`` [N, k]."""
        self._check_fitted()
        p = as_probs(probs, allow_empty=True)
        if p.shape[1] != self.coef_.shape[0]:
            raise ValueError(f"calibrator was fit on {self.coef_.shape[0]} classes, probs have {p.shape[1]}")
        return _log_features(p) @ self.coef_.T + self.intercept_

    def predict_proba(self, probs) -> np.ndarray:
        """Calibrated probabilities ``softmax(W ln p + b)`` [N, k]."""
        return softmax(self.decision_function(probs), axis=1)

    def predict(self, probs) -> np.ndarray:
        """Argmax of the calibrated probabilities."""
        return self.predict_proba(probs).argmax(axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (plain floats and lists)."""
        self._check_fitted()
        return {
            "method": "dirichlet",
            "n_classes": int(self.coef_.shape[0]),
            "W": self.coef_.tolist(),
            "b": self.intercept_.tolist(),
            "reg_lambda": self.reg_lambda,
            "reg_mu": self.reg_mu,
            "normalise": self.normalise,
            "max_iter": self.max_iter,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DirichletCalibrator":
        """Rebuild a fitted calibrator from :meth:`to_dict` output."""
        if data.get("method") != "dirichlet":
            raise ValueError(f"not a Dirichlet calibrator: method={data.get('method')!r}")
        w = np.asarray(data["W"], dtype=np.float64)
        b = np.asarray(data["b"], dtype=np.float64)
        k = w.shape[0] if w.ndim == 2 else -1
        if w.ndim != 2 or w.shape != (k, k) or b.shape != (k,) or k < 2:
            raise ValueError(f"Dirichlet parameters need W [k, k] and b [k] with k >= 2, got {w.shape}, {b.shape}")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ValueError("Dirichlet parameters must be finite")
        cal = cls(
            reg_lambda=data.get("reg_lambda", 0.0),
            reg_mu=data.get("reg_mu", 0.0),
            max_iter=data.get("max_iter", 300),
            normalise=data.get("normalise", True),
        )
        cal.coef_, cal.intercept_ = w, b
        cal.n_iter_ = int(data.get("n_iter", 0))
        cal.converged_ = bool(data.get("converged", True))
        return cal

    def __repr__(self) -> str:
        return (
            f"DirichletCalibrator(reg_lambda={self.reg_lambda!r}, reg_mu={self.reg_mu!r}, "
            f"max_iter={self.max_iter!r}, normalise={self.normalise!r})"
        )
