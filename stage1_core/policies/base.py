"""The exit-policy interface: load from its file, decide from probabilities (and gate scores).

A policy never invents a threshold: every number it decides with comes from its policy file
(``thresholds.json``, ``gateparams.json``, ...), which was fit on val_calib. Evaluation and the
deploy bundle both call :meth:`ExitPolicy.decide`, so they cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..artifacts import read_json
from ..metrics._inputs import as_probs

__all__ = ["Decisions", "ExitPolicy", "DEFERRED_SET"]

DEFERRED_SET: tuple[int, ...] = (0, 1)


@dataclass(frozen=True)
class Decisions:
    """Per-sample decisions of an exit policy.

    ``label`` is the argmax prediction (meaningful when ``exit`` is True); ``prediction_sets``
    holds ``(label,)`` for exited samples and ``(0, 1)`` for deferred ones.
    """

    exit: np.ndarray
    label: np.ndarray
    p_roadwork: np.ndarray
    prediction_sets: list[tuple[int, ...]]

    def __len__(self) -> int:
        return int(self.exit.shape[0])

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per sample (``label`` is None when deferred)."""
        return [
            {
                "exit": bool(e),
                "label": int(lab) if e else None,
                "p_roadwork": float(p),
                "prediction_set": list(s),
            }
            for e, lab, p, s in zip(self.exit, self.label, self.p_roadwork, self.prediction_sets)
        ]


class ExitPolicy(ABC):
    """An exit policy: which samples Stage 1 answers at once, and which it defers."""

    name: ClassVar[str]
    policy_file: ClassVar[str]
    schema: ClassVar[str]

    @classmethod
    def from_file(cls, path: str | Path) -> "ExitPolicy":
        """Read and schema-validate the policy file, then build the policy from it."""
        data = read_json(path, schema=cls.schema)
        if data.get("policy") != cls.name:
            raise ValueError(f"{path}: holds policy {data.get('policy')!r}, expected {cls.name!r}")
        return cls.from_dict(data)

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExitPolicy":
        """Build the policy from the parameters in ``data`` (a policy file's content)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The parameters the policy decides with (``from_dict(to_dict())`` round-trips)."""

    def companion_files(self) -> dict[str, Path]:
        """Files the policy file needs beside it (name -> path), copied into a bundle with it; none by default."""
        return {}

    @abstractmethod
    def exit_mask(self, probs: np.ndarray, gate_scores: np.ndarray | None = None) -> np.ndarray:
        """Boolean [N] array: True where the sample exits at Stage 1."""

    def decide(self, probs, gate_scores=None) -> Decisions:
        """Decisions for softmax probabilities ``probs`` [N, 2] (and, for gated policies, gate scores)."""
        p = as_probs(probs, allow_empty=True)
        if p.shape[1] != 2:
            raise ValueError(f"exit policies are binary: probs must be [N, 2], got {p.shape}")
        exits = np.asarray(self.exit_mask(p, gate_scores), dtype=bool)
        label = p.argmax(axis=1).astype(np.int64)
        sets = [(int(lab),) if e else DEFERRED_SET for e, lab in zip(exits, label)]
        return Decisions(exit=exits, label=label, p_roadwork=p[:, 1].copy(), prediction_sets=sets)
