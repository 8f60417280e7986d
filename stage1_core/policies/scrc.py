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
from ..calibration.gate import GateCalibrator, gate_events
from ..calibration.scrc import (
    MIN_TEST_BATCH,
    _finite,
    apply_gate_calibration,
    check_gate_calibrator,
    choose_order,
    choose_selection_rate,
    scrc_exits,
    scrc_inductive,
    scrc_transductive,
    scrcparams_document,
)
from ..calibration.threshold_sweep import certify_score_threshold
from ..metrics._inputs import as_labels, as_probs
from ..metrics.exit import coverage_at_prior
from ..metrics.paired import bootstrap_mean_ci, exit_summary, paired_bootstrap_difference
from ..reporting.text import fmt, fmt_threshold, pct
from .base import DEFERRED_SET, Decisions, ExitPolicy, FitInputs, FittedPolicy, calib_metrics
from .registry import register_policy

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


@register_policy
class SCRCExitPolicy(ExitPolicy):
    """Exit when the calibrated gate selects a sample and its conformal set is a singleton.

    ``transductive`` (SCRC-T) makes every :meth:`decide` call recompute the thresholds from
    val_calib's outputs and the batch it is given; ``lambda1``/``lambda2`` are then the reference
    thresholds of val_calib alone, reported but not used.
    """

    name = "scrc"
    policy_file = "scrcparams.json"
    schema = "scrcparams"
    settings = ("scrc_variant", "use_dirichlet", "dirichlet_lambda", "dirichlet_mu", "calibration_iters")
    companion_file_names = (CALIBRATION_FILE,)
    threshold_key = "lambda1"
    bound_key = "fnr_bound"

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
    def fit_splits(cls, cfg: Any) -> tuple[str, ...]:
        """val_select fits the calibrators and chooses the family; val_calib certifies."""
        return ("val_select", "val_calib")

    @classmethod
    def fit(cls, inputs: FitInputs) -> FittedPolicy:
        """SCRC (two-stage selective conformal risk control) on val_calib, calibrators fit on val_select.

        SCRC-I (``scrc_variant: I``) certifies the max-coverage (lambda1, lambda2) with the binomial
        LTT, over the candidate family (2-D frontier, gate-only or softmax-only) that certified the
        most coverage on val_select (``choose_order``); SCRC-T (``T``) records the selection rate (chosen
        on val_select), the reference thresholds of val_calib alone and a companion file with val_calib's outputs, from which every prediction
        batch recomputes its thresholds. Both also certify SCRC's special cases on the same calibrated
        scores for comparison: the gate policy (g >= t) and the softmax policy (max q >= t), answers
        argmax q.
        """
        from ..reporting.scrc_figures import plot_scrc_frontier  # matplotlib

        cfg, out_dir = inputs.cfg, inputs.out_dir
        sel, calib = inputs.take("select"), inputs.take("calibrate")
        sel_probs, sel_raw, sel_labels = sel.probs, sel.gate_logits, sel.labels
        probs, raw, labels = calib.probs, calib.gate_logits, calib.labels
        if raw is None or sel_raw is None:
            raise ValueError("the checkpoint has no gate head, so the SCRC policy cannot be fitted "
                             "(its stage 1 selects on the gate score); use a gated head (head_kind 'gated')")
        calibrator, gate_spec = fit_scrc_calibrators(cfg, sel_probs, sel_raw, sel_labels)
        identity = cls(None, None, calibrator, gate_spec)
        q, g = identity.calibrated(probs, raw)
        target, delta = cfg.target_fnr_exit, cfg.delta
        files: list[str] = []
        transductive = None
        q_sel, g_sel = identity.calibrated(sel_probs, sel_raw)
        if cfg.scrc_variant == "I":
            order, order_rows = choose_order(g_sel, q_sel, sel_labels, target, delta)
            result = scrc_inductive(g, q, labels, target, delta, order=order)
            result.method_params["order_choice"] = {"split": "val_select", "families": order_rows}
        else:
            rate, rows = choose_selection_rate(g_sel, q_sel, sel_labels, target)
            result = scrc_transductive(g, q, labels, g[:0], q[:0], target, rate, min_test=0, delta=delta)
            save_calibration_outputs(out_dir / CALIBRATION_FILE, probs, raw, labels)
            files.append(CALIBRATION_FILE)
            transductive = {"selection_rate": rate, "selection_rate_fit_split": "val_select",
                            "selection_rate_candidates": rows, "min_test": MIN_TEST_BATCH,
                            "calibration_file": CALIBRATION_FILE}
        answers = q.argmax(1)
        special = {}
        for name, score in (("gate", g), ("softmax", q.max(1))):
            cert = certify_score_threshold(score, answers, labels, target, delta)
            exits = score >= cert.exit_threshold if cert.exit_threshold is not None else np.zeros(len(labels), bool)
            special[name] = _special_case(cert, exits, labels, cfg.deploy_prior)
        metrics = {**calib_metrics(q, labels), "accuracy_uncalibrated": float((probs.argmax(1) == labels).mean())}
        doc = scrcparams_document(
            result, calibrator, gate_spec, inputs.checkpoint_id, cfg.deploy_prior,
            float(coverage_at_prior(result.calib_exits, labels, cfg.deploy_prior)), metrics=metrics,
            calibrator_fit_split="val_select", special_cases=special, transductive=transductive,
        )
        figure = plot_scrc_frontier(doc, out_dir / "scrc_frontier.png")
        metadata = {
            "certified": bool(result.certified), "scrc_variant": result.variant, "lambda1": result.lambda1,
            "lambda2": result.lambda2, "coverage": float(result.coverage), "fnr_bound": float(result.fnr_bound),
            "n_exited_positives": int(result.n_exited_positives), "method": result.method, "reason": result.reason,
            "coverage_at_deploy_prior": doc["coverage_at_deploy_prior"], "calibrator": calibrator["method"],
            "gate_calibrator": gate_spec["method"], "calibrator_fit_split": "val_select",
            "gate_coverage": special["gate"]["coverage"], "softmax_coverage": special["softmax"]["coverage"],
        }
        if transductive is not None:
            metadata["selection_rate"] = transductive["selection_rate"]
        else:
            metadata["order"] = result.method_params["order"]
        choice = (transductive["selection_rate_candidates"] if transductive is not None
                  else result.method_params["order_choice"]["families"])
        table = "selection rates (val_select)" if transductive is not None else "candidate families (val_select)"
        special_rows = [{"policy": name, **{k: v for k, v in case.items() if k != "reason"}} for name, case in special.items()]
        return FittedPolicy(doc, metadata, {"SCRC certified frontier (val_calib)": figure},
                            {table: choice, "special cases (val_calib)": special_rows}, files=files)

    @classmethod
    def reported_probs(cls, decisions: Decisions, probs: np.ndarray) -> np.ndarray:
        """SCRC answers from its calibrated q: evaluation reports what is deployed."""
        return decisions.probs

    @classmethod
    def evaluation_extras(cls, certificate: dict[str, Any], probs: np.ndarray, gate_logits: np.ndarray | None,
                          decisions: Any, labels: np.ndarray, cfg: Any, out_dir: Path,
                          ) -> tuple[dict[str, Any], dict[str, Path]]:
        """``scrc_comparison``: SCRC next to its special cases (gate, softmax) on val_test.

        With the deployed SCRC decisions: the coverage, exit accuracy and FNR on exits of SCRC and of
        the gate policy (g >= t) and the softmax policy (max q >= t) certified on the same calibrated
        scores, paired bootstrap CIs of SCRC's coverage gain over each, and the stage-2 set
        statistics (singleton / {0,1} / empty rates over the selected samples, empirical set
        coverage, and the set coverage of selected positives - the quantity the sets are built to
        keep >= 1 - target - with its bootstrap CI). Figures: the certified frontier, the three
        policies' coverage, and FNR on exits vs coverage for g and max q.
        """
        from ..reporting.exit_figures import plot_fnr_coverage  # matplotlib
        from ..reporting.scrc_figures import plot_policy_coverage, plot_scrc_frontier

        q = np.asarray(decisions.probs, dtype=float)
        g = np.asarray(decisions.gate_score, dtype=float)
        answers = q.argmax(1)
        scrc_exits = np.asarray(decisions.exit, dtype=bool)
        special = special_case_exits(certificate, q, g)
        summary: dict[str, Any] = {
            "variant": certificate["scrc_variant"],
            "lambda1": decisions.lambda1,
            "lambda2": decisions.lambda2,
            "reason": decisions.reason,
            "scrc": {**exit_summary(scrc_exits, np.asarray(decisions.label), labels),
                     "certified_coverage": float(certificate["coverage"])},
        }
        bars = {}
        for name, exits in (("scrc", scrc_exits), *special.items()):
            ci = bootstrap_mean_ci(exits.astype(float), cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
            certified = certificate["coverage"] if name == "scrc" else certificate["special_cases"][name]["coverage"]
            bars[name] = {"coverage": ci["value"], "ci_lower": ci["ci_lower"], "ci_upper": ci["ci_upper"],
                          "certified_coverage": float(certified)}
            if name != "scrc":
                summary[name] = {**exit_summary(exits, answers, labels),
                                 "exit_threshold": certificate["special_cases"][name]["exit_threshold"],
                                 "certified_coverage": float(certified)}
                summary[f"coverage_gain_vs_{name}"] = paired_bootstrap_difference(
                    scrc_exits, exits, cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
        summary["sets"] = set_summary(decisions, labels, float(certificate["target_fnr"]), cfg)
        figures = {
            "SCRC certified frontier (val_calib)": plot_scrc_frontier(certificate, out_dir / "scrc_frontier.png"),
            "coverage of SCRC, gate and softmax policies (val_test)": plot_policy_coverage(
                bars, out_dir / "policy_coverage.png"),
            "FNR on exits vs coverage, gate and softmax scores (val_test)": plot_fnr_coverage(
                {"calibrated gate g": (g, answers), "calibrated max q": (q.max(1), answers)}, labels,
                float(certificate["target_fnr"]), out_dir / "scores_fnr_coverage.png",
                operating={"calibrated gate g": summary["gate"]["coverage"],
                           "calibrated max q": summary["softmax"]["coverage"]}),
        }
        return {"scrc_comparison": summary}, figures

    @classmethod
    def headline(cls, doc: Any) -> dict[str, Any]:
        """SCRC's operating point: (lambda1, lambda2) and its FNR bound."""
        return {"exit_threshold": doc.get("exit_threshold"), "calib_coverage": doc["coverage"],
                "calib_fnr_upper_bound": doc.get(cls.bound_key),
                **{k: doc[k] for k in ("lambda1", "lambda2") if k in doc}}

    @classmethod
    def companion_descriptions(cls, doc: Any) -> dict[str, str]:
        companion = (doc.get("transductive") or {}).get("calibration_file")
        if not companion:
            return {}
        return {companion: "SCRC-T: val_calib's outputs and labels, from which each batch's thresholds are recomputed"}

    @classmethod
    def readme_section(cls, doc: Any) -> list[str]:
        """Plain-words meaning of ``scrcparams.json`` (two-stage selective conformal risk control)."""
        rule = (
            "Stage 1 selects an image when its calibrated gate score g (a Platt/isotonic map of the gate logit) "
            "is at least lambda1; it then builds the set C = {y : q_y >= 1 - lambda2} from the Dirichlet-calibrated "
            "probabilities q. The image **exits** iff it is selected and C holds a single label, which is its answer; "
            "every other image is **deferred** to Stage 2 (prediction set {0, 1})."
        )
        if doc.get("scrc_variant") == "SCRC-T":
            t = doc.get("transductive") or {}
            lines = [
                rule, "",
                f"Variant SCRC-T (transductive): lambda1 and lambda2 are recomputed for every batch from val_calib's "
                f"outputs (`{t.get('calibration_file')}`) and the batch itself, so images must be predicted together "
                f"(`stage1 predict --transductive`, `Stage1Bundle.predict(images, transductive=True)`), at least "
                f"{t.get('min_test')} at once. Stage 1 selects the top {pct(t.get('selection_rate'))} of the pooled "
                f"gate scores. Guarantee (in expectation, not with a confidence level): the share of selected roadwork "
                f"images whose set misses roadwork is at most {fmt(doc.get('target_fnr'))}.",
            ]
            if not doc.get("certified"):
                lines += ["", f"On val_calib alone the target is out of reach: {doc.get('reason')}"]
            return lines
        if not doc.get("certified"):
            return ["Nothing was certified, so this policy **exits no image**: every image is deferred to Stage 2 "
                    "(prediction set {0, 1}). There is no default threshold.", "", f"Reason: {doc.get('reason') or 'not recorded'}"]
        delta = doc.get("delta")
        return [
            rule, "",
            f"Variant SCRC-I: lambda1 = {fmt_threshold(doc.get('lambda1'))}, lambda2 = {fmt_threshold(doc.get('lambda2'))}, read from "
            f"the policy file. Certificate: on {doc.get('n_calib', 'n/a')} val_calib images (method "
            f"`{doc.get('method')}` over {doc.get('n_candidates')} candidate pairs), the FNR on exits is at most "
            f"{fmt(doc.get('target_fnr'))} with probability at least {fmt(None if delta is None else 1 - delta)}: its "
            f"one-sided Clopper-Pearson bound is {fmt(doc.get('fnr_bound'))} from {doc.get('n_exited_positives')} exited "
            f"positives.",
            "",
            f"Coverage on val_calib: {pct(doc.get('coverage'))}; at the deployment prior {fmt(doc.get('deploy_prior'))}: "
            f"{pct(doc.get('coverage_at_deploy_prior'))}.",
        ]

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


def _special_case(result: Any, exits: np.ndarray, labels: np.ndarray, deploy_prior: float) -> dict[str, Any]:
    """A 1-D certificate as ``scrcparams.json`` records SCRC's special cases."""
    return {
        "exit_threshold": result.exit_threshold, "certified": bool(result.certified), "coverage": float(result.coverage),
        "coverage_at_deploy_prior": float(coverage_at_prior(exits, labels, deploy_prior)),
        "fnr_on_exits": result.fnr_on_exits, "fnr_upper_bound": float(result.fnr_upper_bound),
        "exit_accuracy": result.exit_accuracy, "n_exited_positives": int(result.n_exited_positives),
        "n_false_negatives": int(result.n_false_negatives), "method": result.method,
        "test_level": float(result.test_level), "reason": result.reason,
    }


def fit_scrc_calibrators(cfg: Any, probs: np.ndarray, raw_gate: np.ndarray, labels: np.ndarray
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(calibrator, gate_calibrator)`` specs fit on val_select outputs (see calibration/scrc.py).

    Dirichlet (``use_dirichlet``; L-BFGS, ``calibration_iters`` iterations, ODIR ``dirichlet_lambda``
    / ``dirichlet_mu``) maps the softmax to ``q``; the gate calibrator (``gate_calibration``) maps
    the raw gate logit to the probability that the answer argmax q is correct.
    """
    if cfg.use_dirichlet:
        dirichlet = DirichletCalibrator(cfg.dirichlet_lambda, cfg.dirichlet_mu, max_iter=cfg.calibration_iters)
        calibrator = dirichlet.fit(probs, labels).to_dict()
        q = dirichlet.predict_proba(probs)
    else:
        calibrator, q = {"method": "none"}, probs
    gate = GateCalibrator(cfg.gate_calibration, "correct").fit(raw_gate, gate_events(q.argmax(1), labels, "correct"))
    return calibrator, gate.to_dict()


def special_case_exits(policy_doc: dict[str, Any], q: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    """Exit masks of the certified special cases recorded in ``scrcparams.json`` (gate: g >= t; softmax: max q >= t)."""
    cases = policy_doc.get("special_cases")
    if not cases:
        raise ValueError("scrcparams.json records no special cases (gate, softmax): re-fit the exit policy")
    out = {}
    for name, score in (("gate", g), ("softmax", q.max(1))):
        t = cases[name]["exit_threshold"]
        out[name] = score >= t if t is not None else np.zeros(score.shape[0], dtype=bool)
    return out


def set_summary(decisions: Any, labels: np.ndarray, target_fnr: float, cfg: Any) -> dict[str, Any]:
    """Stage-2 set statistics of SCRC decisions over the selected samples, with the positives' set coverage CI."""
    selected = np.asarray(decisions.selected, dtype=bool)
    sets = [s for s, sel in zip(decisions.scrc_sets, selected) if sel]
    sizes = np.array([len(s) for s in sets], dtype=int)
    y_sel = labels[selected]
    covered = np.array([int(y) in s for s, y in zip(sets, y_sel)], dtype=float)
    positives = covered[y_sel == 1]
    ci = bootstrap_mean_ci(positives, cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
    n_sel = int(selected.sum())
    rate = (lambda mask: float(mask.mean()) if n_sel else None)
    return {
        "n_selected": n_sel,
        "selection_rate": float(selected.mean()) if selected.size else 0.0,
        "singleton_rate": rate(sizes == 1),
        "full_rate": rate(sizes == 2),
        "empty_rate": rate(sizes == 0),
        "set_coverage": float(covered.mean()) if n_sel else None,
        "positive_set_coverage": ci,
        "positive_set_coverage_target": 1.0 - float(target_fnr),
    }
