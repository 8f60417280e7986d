"""SCRC exit policy (phase 6), from ``scrcparams.json``.

A sample exits iff ``g >= lambda1`` and its set ``C(x) = {y : q_y >= 1 - lambda2}`` is a singleton
(:mod:`stage1_core.calibration.scrc`). Both calibrations travel inside the policy file as plain
numbers, so the policy needs nothing else:

* ``q = calibrator(p)``: a Dirichlet calibrator (``{"method": "dirichlet", "W", "b", ...}``) or
  the identity (``{"method": "none"}``), applied to the raw softmax probabilities ``p``;
* ``g = gate_calibrator(z)`` on the RAW gate logit ``z``
  (:func:`~stage1_core.calibration.scrc.apply_gate_calibration`): ``"platt"``
  ``sigmoid(a * z + b)``, ``"isotonic"`` ``interp(z, x, y)`` (or of ``sigmoid(z)`` with
  ``"input": "sigmoid"``), ``"none"`` ``sigmoid(z)``. ``GateCalibrator.to_dict()`` output
  (:mod:`stage1_core.calibration.gate`) is accepted too and stored in the flat form.

``gate_scores`` are therefore required (ValueError without them). ``lambda1 = lambda2 = None``
(nothing certified) exits nothing. :meth:`SCRCExitPolicy.decide` answers with the calibrated
argmax and reports ``p_roadwork = q_1``; deferred samples get the set (0, 1) in
``prediction_sets``, and :class:`SCRCDecisions` adds the stage-2 set itself.

SCRC-T (``scrc_variant: "SCRC-T"``) has no fixed thresholds: every call of :meth:`decide`
treats its rows as the unlabelled test batch and recomputes ``(lambda1, lambda2)`` with
:func:`~stage1_core.calibration.scrc.scrc_transductive` from val_calib's outputs, which travel in
a companion file (``transductive.calibration_file``, next to the policy file and under the
bundle's checksums; :meth:`SCRCExitPolicy.from_file` loads it). A batch smaller than
``transductive.min_test`` is refused. The thresholds stored in the policy file are then only
the reference of val_calib alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import load_tensors, read_json
from ..calibration.dirichlet import DirichletCalibrator
from ..calibration.scrc import _finite, apply_gate_calibration, check_gate_calibrator, scrc_exits, scrc_transductive
from ..metrics._inputs import as_labels, as_probs
from .base import DEFERRED_SET, Decisions, ExitPolicy

__all__ = [
    "SCRCExitPolicy",
    "SCRCDecisions",
    "TransductiveSettings",
    "CALIBRATION_FILE",
    "save_calibration_outputs",
    "apply_gate_calibration",
    "check_gate_calibrator",
]

#: Default name of SCRC-T's companion file (val_calib's raw outputs and labels).
CALIBRATION_FILE = "scrc_calibration.pt"


def _calibration_arrays(probs, gate_logits, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked val_calib outputs: probabilities [N, 2], finite raw gate logits [N], labels [N]."""
    p = as_probs(probs, name="val_calib probs")
    if p.shape[1] != 2:
        raise ValueError(f"SCRC-T calibration probs must be [N, 2], got {p.shape}")
    z = np.asarray(gate_logits, dtype=np.float64).reshape(-1)
    if z.shape[0] != p.shape[0] or not np.all(np.isfinite(z)):
        raise ValueError(f"SCRC-T calibration gate logits must be {p.shape[0]} finite numbers, got {z.shape[0]}")
    return p, z, as_labels(labels, n=p.shape[0])


@dataclass(frozen=True)
class TransductiveSettings:
    """What SCRC-T recomputes its thresholds from at prediction time.

    ``probs`` [N, 2] softmax probabilities, ``gate_logits`` [N] raw gate logits and ``labels`` [N]
    of val_calib (the policy applies its own calibrators to them); ``selection_rate`` the pooled
    fraction stage 1 selects, ``target_fnr`` the CRC target, ``min_test`` the smallest batch.
    """

    probs: np.ndarray
    gate_logits: np.ndarray
    labels: np.ndarray
    selection_rate: float
    target_fnr: float
    min_test: int
    calibration_file: str = CALIBRATION_FILE

    def __post_init__(self) -> None:
        p, z, y = _calibration_arrays(self.probs, self.gate_logits, self.labels)
        object.__setattr__(self, "probs", p)
        object.__setattr__(self, "gate_logits", z)
        object.__setattr__(self, "labels", y)
        rate = _finite(self.selection_rate, "selection_rate")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"selection_rate must lie in (0, 1], got {rate!r}")
        if isinstance(self.min_test, bool) or not isinstance(self.min_test, (int, np.integer)) or self.min_test < 1:
            raise ValueError(f"min_test must be an integer >= 1, got {self.min_test!r}")
        if "/" in self.calibration_file or "\\" in self.calibration_file or self.calibration_file in ("", ".", ".."):
            raise ValueError(f"calibration_file must be a plain file name next to the policy file, got {self.calibration_file!r}")


def save_calibration_outputs(path: str | Path, probs, gate_logits, labels) -> Path:
    """Write SCRC-T's companion file: val_calib probabilities, raw gate logits and labels (plain tensors)."""
    import torch

    from ..artifacts import save_tensors

    p, z, y = _calibration_arrays(probs, gate_logits, labels)
    return save_tensors(path, {
        "probs": torch.as_tensor(p, dtype=torch.float64),
        "gate_logits": torch.as_tensor(z, dtype=torch.float64),
        "labels": torch.as_tensor(y, dtype=torch.int64),
    })


def _class_calibrator(spec: dict[str, Any]) -> DirichletCalibrator | None:
    if not isinstance(spec, dict):
        raise TypeError(f"calibrator must be a dict, got {type(spec).__name__}")
    if spec.get("method") == "none":
        return None
    if spec.get("method") == "dirichlet":
        cal = DirichletCalibrator.from_dict(spec)
        if cal.coef_.shape != (2, 2):
            raise ValueError(f"the SCRC policy is binary: Dirichlet W must be [2, 2], got {cal.coef_.shape}")
        return cal
    raise ValueError(f"unknown class calibrator {spec.get('method')!r}; use 'dirichlet' or 'none'")


@dataclass(frozen=True)
class SCRCDecisions(Decisions):
    """:class:`Decisions` plus the SCRC internals per sample.

    ``scrc_sets``: the stage-2 set ``C(x)`` of selected samples (may be (0, 1) or () when
    deferred), None for samples stage 1 did not select; ``selected``: the stage-1 mask;
    ``gate_score``: the calibrated gate score ``g``.
    """

    scrc_sets: list[tuple[int, ...] | None] = field(default_factory=list)
    selected: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    gate_score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: Calibrated class probabilities ``q`` [N, 2] (what the answers and ``p_roadwork`` come from).
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    #: The thresholds these decisions used (SCRC-T: recomputed for this batch; None: exit nothing).
    lambda1: float | None = None
    lambda2: float | None = None
    #: Why nothing exits, when the thresholds are None.
    reason: str | None = None


class SCRCExitPolicy(ExitPolicy):
    """Exit when the calibrated gate selects a sample and its conformal set is a singleton.

    ``transductive`` (SCRC-T) makes every :meth:`decide` call recompute the thresholds from
    val_calib's outputs and the batch it is given; ``lambda1``/``lambda2`` are then the reference
    thresholds of val_calib alone, reported but not used.
    """

    name = "scrc"
    policy_file = "scrcparams.json"
    schema = "scrcparams"

    def __init__(
        self,
        lambda1: float | None,
        lambda2: float | None,
        calibrator: dict[str, Any] | None = None,
        gate_calibrator: dict[str, Any] | None = None,
        transductive: TransductiveSettings | None = None,
    ):
        if (lambda1 is None) != (lambda2 is None):
            raise ValueError("lambda1 and lambda2 must both be numbers or both be None (exit nothing)")
        if lambda1 is not None:
            lambda1 = _finite(lambda1, "lambda1")
            lambda2 = _finite(lambda2, "lambda2")
            if not 0.0 <= lambda2 <= 1.0:
                raise ValueError(f"lambda2 must lie in [0, 1], got {lambda2!r}")
        if transductive is not None and not isinstance(transductive, TransductiveSettings):
            raise TypeError(f"transductive must be TransductiveSettings or None, got {type(transductive).__name__}")
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.calibrator = dict(calibrator) if calibrator is not None else {"method": "none"}
        self.gate_calibrator = check_gate_calibrator(gate_calibrator if gate_calibrator is not None else {"method": "none"})
        self._dirichlet = _class_calibrator(self.calibrator)
        self.transductive = transductive
        self.source_dir: Path | None = None
        self._calib: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if transductive is not None:
            q_c, g_c = self.calibrated(transductive.probs, transductive.gate_logits)
            self._calib = (g_c, q_c, transductive.labels)

    @property
    def variant(self) -> str:
        """``"SCRC-T"`` when thresholds are recomputed per batch, else ``"SCRC-I"``."""
        return "SCRC-T" if self.transductive is not None else "SCRC-I"

    @property
    def min_batch(self) -> int:
        """Smallest batch :meth:`decide` accepts (1 for SCRC-I)."""
        return self.transductive.min_test if self.transductive is not None else 1

    @classmethod
    def from_file(cls, path: str | Path) -> "SCRCExitPolicy":
        """Read and schema-validate ``scrcparams.json``; SCRC-T also loads its companion file next to it."""
        path = Path(path)
        data = read_json(path, schema=cls.schema)
        if data.get("policy") != cls.name:
            raise ValueError(f"{path}: holds policy {data.get('policy')!r}, expected {cls.name!r}")
        if data.get("scrc_variant") == "SCRC-T":
            name = data["transductive"]["calibration_file"]
            companion = path.parent / name
            tensors = load_tensors(companion)
            missing = [k for k in ("probs", "gate_logits", "labels") if k not in tensors]
            if missing:
                raise ValueError(f"{companion}: SCRC-T calibration file lacks {missing}; re-fit the exit policy")
            data = dict(data, calibration_data={k: tensors[k].numpy() for k in ("probs", "gate_logits", "labels")})
        policy = cls.from_dict(data)
        policy.source_dir = path.parent
        return policy

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SCRCExitPolicy":
        missing = [k for k in ("lambda1", "lambda2", "calibrator", "gate_calibrator") if k not in data]
        if missing:
            raise ValueError(f"scrc policy data lacks {missing} (use null thresholds to exit nothing)")
        transductive = None
        if data.get("scrc_variant") == "SCRC-T" or "transductive" in data:
            settings = data.get("transductive")
            arrays = data.get("calibration_data")
            if not isinstance(settings, dict) or not isinstance(arrays, dict):
                raise ValueError(
                    "an SCRC-T policy needs its transductive settings and val_calib outputs (calibration_data); "
                    "load it with SCRCExitPolicy.from_file, which reads the companion file"
                )
            transductive = TransductiveSettings(
                arrays["probs"], arrays["gate_logits"], arrays["labels"], settings["selection_rate"],
                data["target_fnr"], settings["min_test"], settings.get("calibration_file", CALIBRATION_FILE),
            )
        return cls(data["lambda1"], data["lambda2"], data["calibrator"], data["gate_calibrator"], transductive)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "policy": self.name,
            "scrc_variant": self.variant,
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "calibrator": dict(self.calibrator),
            "gate_calibrator": dict(self.gate_calibrator),
        }
        t = self.transductive
        if t is not None:
            out.update(
                target_fnr=t.target_fnr,
                transductive={"selection_rate": t.selection_rate, "min_test": t.min_test,
                              "calibration_file": t.calibration_file},
                calibration_data={"probs": t.probs.copy(), "gate_logits": t.gate_logits.copy(), "labels": t.labels.copy()},
            )
        return out

    def companion_files(self) -> dict[str, Path]:
        """Files the policy file needs next to it (SCRC-T's calibration file), by name; empty for SCRC-I."""
        if self.transductive is None:
            return {}
        if self.source_dir is None:
            raise ValueError("this SCRC-T policy was not loaded from a file, so its companion file has no path")
        return {self.transductive.calibration_file: self.source_dir / self.transductive.calibration_file}

    def calibrated(self, probs, gate_scores) -> tuple[np.ndarray, np.ndarray]:
        """``(q, g)``: calibrated probabilities [N, 2] and calibrated gate scores [N]."""
        if gate_scores is None:
            raise ValueError("the scrc policy needs gate_scores (the raw gate logits of the head), got None")
        p = as_probs(probs, allow_empty=True)
        if p.shape[1] != 2:
            raise ValueError(f"the scrc policy is binary: probs must be [N, 2], got {p.shape}")
        z = np.asarray(gate_scores, dtype=np.float64).reshape(-1)
        if z.shape[0] != p.shape[0]:
            raise ValueError(f"gate_scores has {z.shape[0]} entries, probs {p.shape[0]} rows")
        q = p if self._dirichlet is None else self._dirichlet.predict_proba(p)
        return q, apply_gate_calibration(z, self.gate_calibrator)

    def thresholds(self, q: np.ndarray, g: np.ndarray) -> tuple[float | None, float | None, str | None]:
        """``(lambda1, lambda2, reason)`` for a batch of calibrated outputs (SCRC-T recomputes them).

        SCRC-T refuses a batch smaller than ``min_test`` (ValueError saying what to do).
        """
        t = self.transductive
        if t is None:
            return self.lambda1, self.lambda2, None if self.lambda1 is not None else "nothing was certified"
        if q.shape[0] < t.min_test:
            raise ValueError(
                f"this SCRC-T policy recomputes its thresholds from the batch it decides, and needs at least "
                f"{t.min_test} samples together; got {q.shape[0]}. Predict a larger batch at once "
                f"(stage1 predict --transductive with >= {t.min_test} images), or deploy an SCRC-I policy "
                f"(scrc_variant: I), which decides image by image"
            )
        g_c, q_c, y_c = self._calib
        result = scrc_transductive(g_c, q_c, y_c, g, q, t.target_fnr, t.selection_rate, min_test=t.min_test)
        return result.lambda1, result.lambda2, result.reason

    def exit_mask(self, probs: np.ndarray, gate_scores: np.ndarray | None = None) -> np.ndarray:
        """Selected by the calibrated gate and a singleton set; ValueError without ``gate_scores``."""
        return self.decide(probs, gate_scores).exit

    def decide(self, probs, gate_scores=None) -> SCRCDecisions:
        """Decisions with the calibrated answer; ``scrc_sets`` holds the stage-2 sets."""
        q, g = self.calibrated(probs, gate_scores)
        lambda1, lambda2, reason = self.thresholds(q, g)
        exits, answer, sets = scrc_exits(g, q, lambda1, lambda2)
        selected = np.zeros(q.shape[0], dtype=bool) if lambda1 is None else g >= lambda1
        scrc_sets = [tuple(int(c) for c in np.flatnonzero(row)) if s else None for row, s in zip(sets, selected)]
        pred_sets = [(int(a),) if e else DEFERRED_SET for e, a in zip(exits, answer)]
        return SCRCDecisions(
            exit=exits,
            label=answer.astype(np.int64),
            p_roadwork=q[:, 1].copy(),
            prediction_sets=pred_sets,
            scrc_sets=scrc_sets,
            selected=selected,
            gate_score=g,
            probs=q,
            lambda1=lambda1,
            lambda2=lambda2,
            reason=reason,
        )

    def __repr__(self) -> str:
        return (
            f"SCRCExitPolicy(variant={self.variant!r}, lambda1={self.lambda1!r}, lambda2={self.lambda2!r}, "
            f"calibrator={self.calibrator.get('method')!r}, gate_calibrator={self.gate_calibrator['method']!r})"
        )
