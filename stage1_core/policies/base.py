"""The exit-policy interface: one class holds everything of one policy.

A policy never invents a threshold: every number it decides with comes from its policy file
(``thresholds.json``, ``gateparams.json``, ...), which :meth:`ExitPolicy.fit` certified on
val_calib. Evaluation and the deploy bundle both call :meth:`ExitPolicy.decide`, so they cannot
drift apart. Besides deciding, a policy class declares what the phase-agnostic steps ask of it:
the config settings its certificate depends on (lineage), the splits it is fit on, its fit on
those splits' head outputs, its evaluation extras and figures, its bundle README section and its
headline figures. The steps loop over these hooks and never name a policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..artifacts import read_json
from ..metrics._inputs import as_probs
from ..metrics.calibration import compute_ece
from ..reporting.text import fmt, fmt_threshold, pct

__all__ = ["Decisions", "ExitPolicy", "DEFERRED_SET", "SplitOutputs", "FitInputs", "FittedPolicy", "calib_metrics"]

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


@dataclass(frozen=True)
class SplitOutputs:
    """The selected checkpoint's outputs on one split: softmax probabilities [N, 2], raw gate logits
    [N] (None without a gated head) and labels [N], tagged with ``split``: the split that holds the
    rows' sample ids, which the loader reads from their content (``split_of_ids``), never from the
    name the caller asked for. ``""`` is untagged, and no fit accepts it."""

    probs: np.ndarray
    gate_logits: np.ndarray | None
    labels: np.ndarray
    split: str = ""


@dataclass
class FitInputs:
    """What :meth:`ExitPolicy.fit` sees: the head outputs of exactly the splits its
    :meth:`~ExitPolicy.fit_splits` named (the step refuses any other split), the phase-applied
    config, the directory for its figures and companion files, and the checkpoint it certifies."""

    outputs: Mapping[str, SplitOutputs]
    cfg: Any
    out_dir: Path
    checkpoint_id: str

    def __post_init__(self) -> None:
        from ..data.splits import SPLIT_ROLES, USAGE_RULES, SplitError

        for name, outputs in self.outputs.items():
            if not outputs.split:
                raise SplitError(f"outputs {name!r} handed to an exit-policy fit are untagged: a fit takes only "
                                 f"arrays whose split was read from their sample ids (steps.policy.fit_inputs)")
            if SPLIT_ROLES.get(outputs.split) not in FIT_ROLES:
                raise SplitError(f"outputs {name!r} handed to an exit-policy fit hold rows of {outputs.split} "
                                 f"({USAGE_RULES.get(outputs.split, 'no split')}); a policy is fit on val_select "
                                 f"and val_calib only")

    def take(self, role: str) -> SplitOutputs:
        """The outputs whose content tag permits ``role`` (``calibrate``: val_calib, ``select``: val_select).

        Raises :class:`~stage1_core.data.splits.SplitError` when none handed in is tagged for it:
        a fit reads its arrays through here, so rows of another split under any name are refused.
        """
        from ..data.splits import SPLIT_ROLES, SplitError

        if role not in FIT_ROLES:
            raise SplitError(f"an exit-policy fit may only {' or '.join(FIT_ROLES)}, not {role!r}")
        for outputs in self.outputs.values():
            if SPLIT_ROLES[outputs.split] == role:
                return outputs
        held = ", ".join(f"{name!r}: {outputs.split}" for name, outputs in self.outputs.items()) or "nothing"
        permitted = next(split for split, r in SPLIT_ROLES.items() if r == role)
        raise SplitError(f"the fit needs {permitted}'s outputs to {role}, and was handed {held}")


#: What a policy fit may do with the splits handed to it (val_select selects and shapes the score,
#: val_calib certifies); the roles are the splits' own (``stage1_core.data.splits.SPLIT_ROLES``).
FIT_ROLES = ("select", "calibrate")


@dataclass
class FittedPolicy:
    """A fit's output: the policy file's content, its headline figures, figures and tables."""

    document: dict[str, Any]
    metadata: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Companion files the fit wrote next to the policy file (names), recorded in its lineage.
    files: list[str] = field(default_factory=list)


def calib_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Classification figures of ``probs`` on val_calib, recorded in every certificate."""
    from ..metrics.classification import accuracy, mcc  # scikit-learn

    preds = probs.argmax(1)
    return {"accuracy": accuracy(labels, preds), "mcc": mcc(labels, preds), "ece": compute_ece(probs, labels),
            "n": int(len(labels)), "positive_rate": float(labels.mean())}


class ExitPolicy(ABC):
    """An exit policy: which samples Stage 1 answers at once, and which it defers."""

    name: ClassVar[str]
    policy_file: ClassVar[str]
    schema: ClassVar[str]
    #: Config fields the certificate depends on besides the shared promise (``exit_policy``,
    #: ``target_fnr_exit``, ``fnr_confidence``, ``gate_calibration``); recorded in its lineage.
    settings: ClassVar[tuple[str, ...]] = ()
    #: Companion files a fit may write beside the policy file (removed when a refit writes none).
    companion_file_names: ClassVar[tuple[str, ...]] = ()
    #: Keys of the certified threshold and of its FNR upper bound in the policy file.
    threshold_key: ClassVar[str] = "exit_threshold"
    bound_key: ClassVar[str] = "fnr_upper_bound"
    #: Plain words completing "An image exits when ..." (the generic README section).
    exit_rule: ClassVar[str] = "its score reaches t"

    # ----- fitting (the exit_policy step) -------------------------------------------------

    @classmethod
    def fit_splits(cls, cfg: Any) -> tuple[str, ...]:
        """Splits whose head outputs :meth:`fit` needs: val_calib (certificate) and at most val_select."""
        return ("val_calib",)

    @classmethod
    def fit(cls, inputs: FitInputs) -> FittedPolicy:
        """Certify the policy on ``inputs.take("calibrate")`` (val_calib) and return its policy file's content."""
        raise TypeError(f"exit policy {cls.name!r} ({cls.__name__}) defines no fit(): it can be loaded and "
                        f"decide, but the exit_policy step cannot fit it")

    # ----- evaluation, bundle, summary ----------------------------------------------------

    @classmethod
    def reported_probs(cls, decisions: "Decisions", probs: np.ndarray) -> np.ndarray:
        """The probabilities evaluation reports for these decisions (what is deployed): ``probs`` by default."""
        return probs

    @classmethod
    def evaluation_extras(cls, certificate: dict[str, Any], probs: np.ndarray, gate_logits: np.ndarray | None,
                          decisions: "Decisions", labels: np.ndarray, cfg: Any, out_dir: Path,
                          ) -> tuple[dict[str, Any], dict[str, Path]]:
        """Policy-specific val_test figures for ``evaluation.json`` (key -> value) and figure files."""
        return {}, {}

    @classmethod
    def headline(cls, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The certificate's operating point for the bundle headline: threshold and FNR bound."""
        return {"exit_threshold": doc.get(cls.threshold_key), "calib_coverage": doc["coverage"],
                "calib_fnr_upper_bound": doc.get(cls.bound_key)}

    @classmethod
    def companion_descriptions(cls, doc: Mapping[str, Any]) -> dict[str, str]:
        """Bundle README rows for the companion files this certificate uses (name -> what)."""
        return {}

    @classmethod
    def readme_section(cls, doc: Mapping[str, Any]) -> list[str]:
        """Plain-words meaning of the policy file ``doc`` (a one-threshold certificate by default)."""
        threshold = doc.get(cls.threshold_key)
        target, delta = doc.get("target_fnr"), doc.get("delta")
        if not doc.get("certified"):
            return [
                "Nothing was certified, so this policy **exits no image**: every image is deferred to "
                "Stage 2 (prediction set {0, 1}). There is no default threshold.",
                "",
                f"Reason: {doc.get('reason') or 'not recorded'}",
            ]
        return [
            f"An image **exits** at Stage 1 (its label is final) when {cls.exit_rule}, with "
            f"t = {fmt_threshold(threshold)} read from the policy file; every other image is **deferred** "
            f"to Stage 2 (prediction set {{0, 1}}).",
            "",
            f"Certificate: on {doc.get('n_calib', 'n/a')} val_calib images, with method "
            f"`{doc.get('method', 'n/a')}`, the false-negative rate among exited roadwork images "
            f"(FNR on exits) is at most {fmt(target)} with probability at least "
            f"{fmt(None if delta is None else 1 - delta)}: its one-sided Clopper-Pearson upper bound is "
            f"{fmt(doc.get(cls.bound_key))} from {doc.get('n_exited_positives', 'n/a')} exited "
            f"positives (observed FNR on exits {fmt(doc.get('fnr_on_exits'))}).",
            "",
            f"Coverage (fraction of images exited) on val_calib: {pct(doc.get('coverage'))}"
            + (
                f"; at the deployment prior {fmt(doc.get('deploy_prior'))} (share of roadwork "
                f"images): {pct(doc.get('coverage_at_deploy_prior'))}."
                if doc.get("coverage_at_deploy_prior") is not None
                else "."
            ),
        ]

    # ----- loading and deciding (evaluation and deployment) -------------------------------

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
