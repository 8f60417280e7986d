"""Phase 6: conformal risk training works, SCRC coverage is maximised, its prediction sets are valid.

Each criterion sits here whole: its declaration (name, judged asset, text), its reader (which
artifacts it reads, through :mod:`stage1_core.acceptance.readers`) and its pure rule
(``check_*``: figures in, :class:`~stage1_core.gates.GateVerdict` out, unit-tested alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1_core.gates import GateVerdict, _finite
from stage1_core.store import DECISIONS_FILE, read_training

from .compare import paired_compare, paired_verdict
from .readers import bootstrap_settings, evaluation_record, scrc_comparison, scrc_policy, val_test_outcomes
from .registry import declare, reader

if TYPE_CHECKING:
    from stage1_core.steps.context import StepContext


# ----- declarations ------------------------------------------------------------------------

declare("risk_training_works", "evaluation",
        "conformal risk training ran with finite losses and is not worse than its ablation: the checkpoint "
        "it started from (the previous phase's) through the same SCRC fit (calibrators on val_select, "
        "certificate on val_calib), both decided on the same val_test images; passes when the paired "
        "bootstrap CI's lower end of the coverage difference is >= -coverage_margin (gain and CI reported)")

declare("coverage_maximised", "evaluation",
        "the deployed (lambda1, lambda2) is the max-coverage certified candidate (independent "
        "recomputation), and SCRC's val_test coverage is not worse than the certified softmax and gate "
        "policies' (its special cases) on the same checkpoint: the paired bootstrap CI's lower end of the "
        "coverage difference is >= -coverage_margin (4.5 points by default)")

declare("prediction_sets_valid", "evaluation",
        "prediction sets are nested in lambda2, singleton sets are exactly the exits, and the empirical "
        "set coverage on val_test lies within its bootstrap CI of the target the sets were built for")


# ----- rules (pure) ---------------------------------------------------------------------


def check_risk_training_works(
    history: Sequence[Mapping[str, Any]], losses_finite: bool, current_exit: np.ndarray, ablation_exit: np.ndarray,
    ablation: str, coverage_margin: float, bootstrap: Mapping[str, Any],
) -> GateVerdict:
    """Finite losses, and the deployed SCRC policy's val_test coverage not worse than the ablation's.

    ``ablation_exit`` are the val_test exits of the same SCRC fit on the checkpoint without risk
    training (``ablation`` names it); non-inferiority with ``coverage_margin``, the gain and its
    paired CI reported either way.
    """
    train_losses = [row.get("Train_Loss") for row in history]
    val_losses = [row.get("Val_Loss") for row in history]
    finite = bool(losses_finite) and len(history) > 0 and _finite(train_losses) and _finite(val_losses)
    problems = []
    if not finite:
        problems.append("no epoch was logged" if not history else "a training or validation loss was not finite")
    coverage = paired_compare(current_exit, ablation_exit, margin=coverage_margin, direction="non-inferiority",
                              **bootstrap)
    return paired_verdict("risk_training_works",
                          [("coverage", f"val_test SCRC coverage with risk training vs without ({ablation})", *coverage)],
                          problems, {"losses_finite": finite, "epochs_run": len(history), "ablation": ablation})


def ablation_exits(cfg: Any, outputs: Mapping[str, Any], checkpoint_id: str) -> np.ndarray:
    """val_test exits of the deployed policy family fit the same way on another checkpoint's outputs.

    ``outputs`` holds that checkpoint's :class:`~stage1_core.policies.base.SplitOutputs` of
    val_select, val_calib and val_test; the fit sees only the splits its policy names.
    """
    import tempfile
    from pathlib import Path

    from stage1_core.policies.base import FitInputs
    from stage1_core.policies.registry import policy_class

    cls = policy_class(cfg.exit_policy)
    fit_outputs = {split: outputs[split] for split in cls.fit_splits(cfg)}
    with tempfile.TemporaryDirectory(prefix="ablation_") as scratch:
        fitted = cls.fit(FitInputs(fit_outputs, cfg, Path(scratch), checkpoint_id))
        policy = cls.from_dict(fitted.document)
        test = outputs["val_test"]
        decisions = policy.decide(test.probs, gate_scores=test.gate_logits)
    return np.asarray(decisions.exit, dtype=float)


def scrc_exits_plain(g: np.ndarray, q: np.ndarray, lambda1: float | None, lambda2: float | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(exit, answer, set_size)`` of the SCRC rule written out plainly (no code shared with the fitter).

    Selected iff g >= lambda1; set = {y : q_y >= 1 - lambda2}; exit iff selected and the set has one
    label, which is the answer (argmax q elsewhere). ``None`` thresholds exit nothing.
    """
    g = np.asarray(g, dtype=float).reshape(-1)
    q = np.asarray(q, dtype=float)
    if lambda1 is None or lambda2 is None:
        return np.zeros(g.shape[0], dtype=bool), q.argmax(1), np.zeros(g.shape[0], dtype=int)
    members = q >= 1.0 - float(lambda2)
    size = members.sum(axis=1) * (g >= float(lambda1))
    exit_ = size == 1
    answer = np.where(exit_, members[:, 1].astype(int), q.argmax(1))
    return exit_, answer, size


def _binom_pvalue(k: int, n: int, target: float) -> float:
    from scipy.stats import binom

    return float(binom.cdf(k, n, target)) if n > 0 else 1.0


def recompute_scrc_inductive(policy: Mapping[str, Any], g: np.ndarray, q: np.ndarray, labels: np.ndarray
                             ) -> dict[str, Any]:
    """Recompute every recorded SCRC-I candidate on val_calib: counts, p-values, and the max-coverage certified one.

    Returns the number of rows whose counts differ from the record, rows marked certified whose
    recomputed p-value exceeds the test level (or tested-and-not-certified rows below it), the
    certified row with the most exits, and whether it is the deployed pair.
    """
    y = np.asarray(labels).astype(int)
    target, level = float(policy["target_fnr"]), float(policy["test_level"])
    mismatched, wrong_verdicts = [], []
    best: tuple[int, float, float] | None = None
    for i, row in enumerate(policy.get("sweep_results") or []):
        exits, answer, _ = scrc_exits_plain(g, q, row["lambda1"], row["lambda2"])
        pos = exits & (y == 1)
        n_exit, n_pos, n_fn = int(exits.sum()), int(pos.sum()), int((pos & (answer == 0)).sum())
        if (n_exit, n_pos, n_fn) != (row["n_exited"], row["n_exited_positives"], row["n_false_negatives"]):
            mismatched.append(i)
        p = _binom_pvalue(n_fn, n_pos, target)
        if row["certified"] and p > level * (1 + 1e-9):
            wrong_verdicts.append(i)
        elif row["tested"] and not row["certified"] and p <= level * (1 - 1e-9):
            wrong_verdicts.append(i)
        if row["certified"] and (best is None or n_exit > best[0]):
            best = (n_exit, float(row["lambda1"]), float(row["lambda2"]))
    deployed_exits, _, _ = scrc_exits_plain(g, q, policy.get("lambda1"), policy.get("lambda2"))
    deployed = int(deployed_exits.sum())
    return {
        "n_rows": len(policy.get("sweep_results") or []), "rows_with_other_counts": len(mismatched),
        "rows_with_wrong_verdict": len(wrong_verdicts), "best_certified_exits": None if best is None else best[0],
        "best_certified": None if best is None else [best[1], best[2]], "deployed_exits": deployed,
        "deployed_coverage": deployed / max(len(y), 1), "recorded_coverage": float(policy["coverage"]),
        "deployed_is_best": best is not None and deployed == best[0],
    }


def recompute_scrc_transductive(
    policy: Mapping[str, Any], g_calib: np.ndarray, q_calib: np.ndarray, y_calib: np.ndarray,
    g_batch: np.ndarray, q_batch: np.ndarray, deployed_exits: np.ndarray,
) -> dict[str, Any]:
    """Recompute SCRC-T's thresholds for a batch from the stated formulas (plain loops) and its exits.

    lambda1 = the ceil(rate (n + m))-th largest pooled gate score; on the selected calibration
    positives, lambda2 = the smallest l >= 0.5 over {0.5} and the values 1 - q_1 with
    n_s/(n_s+1) R(l) + 1/(n_s+1) <= target, R(l) = share of them with q_1 < 1 - l (the most
    permissive feasible set threshold, i.e. the max-coverage one).
    """
    import math

    rate, target = float(policy["transductive"]["selection_rate"]), float(policy["target_fnr"])
    pooled = np.sort(np.concatenate([np.asarray(g_calib, float), np.asarray(g_batch, float)]))[::-1]
    lambda1 = float(pooled[max(1, math.ceil(rate * pooled.size - 1e-9)) - 1])
    y = np.asarray(y_calib).astype(int)
    q1 = np.asarray(q_calib, float)[(np.asarray(g_calib) >= lambda1) & (y == 1), 1]
    n_s = q1.size
    lambda2 = None
    values = [float(v) for v in 1.0 - q1 if v >= 0.5]
    candidates = {0.5, *values, *(float(np.nextafter(v, 2.0)) for v in values)}  # float rounding at the boundary
    for lam in sorted(c for c in candidates if c <= 1.0):
        misses = int(np.sum(q1 < 1.0 - lam))
        if n_s and (misses + 1.0) / (n_s + 1.0) <= target + 1e-12:
            lambda2 = lam
            break
    exits, _, _ = scrc_exits_plain(g_batch, q_batch, lambda1 if lambda2 is not None else None, lambda2)
    deployed = np.asarray(deployed_exits, dtype=bool)
    return {"lambda1": lambda1, "lambda2": lambda2, "n_selected_positives": int(n_s),
            "exits_differing": int((exits != deployed).sum()), "recomputed_exits": int(exits.sum()),
            "deployed_exits": int(deployed.sum()), "deployed_is_best": bool(np.array_equal(exits, deployed))}


def check_coverage_maximised(recomputed: Mapping[str, Any], comparison: Mapping[str, Any],
                             coverage_margin: float) -> GateVerdict:
    """The deployed (lambda1, lambda2) is the max-coverage certified candidate, and SCRC's val_test
    coverage is not worse than the certified gate and softmax policies' (its special cases) on the
    same checkpoint.

    ``recomputed``: :func:`recompute_scrc_inductive` or :func:`recompute_scrc_transductive`;
    ``comparison``: the evaluation's ``scrc_comparison``. Non-inferiority with the burden of proof on
    the claim: each paired bootstrap CI of the coverage difference (SCRC minus the special case) must
    have its lower end >= -``coverage_margin``. A CI that merely reaches 0 is no evidence; a small
    significant loss within the margin passes and is reported (SCRC's two-threshold search pays for
    its multiple testing in coverage).
    """
    problems = []
    if not recomputed.get("deployed_is_best"):
        problems.append(f"the deployed thresholds are not the max-coverage certified candidate "
                        f"(recomputed: {dict(recomputed)})")
    for key in ("rows_with_other_counts", "rows_with_wrong_verdict", "exits_differing"):
        if recomputed.get(key):
            problems.append(f"{recomputed[key]} {key.replace('_', ' ')} in the recomputation")
    scrc = float(comparison["scrc"]["coverage"])
    figures: dict[str, Any] = {"scrc_coverage": scrc, "coverage_margin": float(coverage_margin),
                               **{f"recomputed_{k}": v for k, v in recomputed.items() if not isinstance(v, (list, dict))}}
    parts = []
    for name in ("gate", "softmax"):
        other = float(comparison[name]["coverage"])
        ci = comparison[f"coverage_gain_vs_{name}"]
        figures.update({f"{name}_coverage": other, f"gain_vs_{name}": scrc - other,
                        f"gain_vs_{name}_ci_lower": ci["ci_lower"], f"gain_vs_{name}_ci_upper": ci["ci_upper"]})
        parts.append(f"{name} {other:.4f} (gain {scrc - other:+.4f}, CI [{ci['ci_lower']:+.4f}, {ci['ci_upper']:+.4f}])")
        if ci["ci_lower"] < -coverage_margin - 1e-12:
            problems.append(f"SCRC's val_test coverage {scrc:.4f} vs the {name} policy's {other:.4f}: paired bootstrap "
                            f"CI of the gain [{ci['ci_lower']:+.4f}, {ci['ci_upper']:+.4f}] reaches below "
                            f"-{coverage_margin:.4f} (non-inferiority margin): not shown to be not worse")
    message = "; ".join(problems) or (
        f"deployed thresholds are the max-coverage certified candidate; val_test coverage SCRC {scrc:.4f} vs "
        + ", ".join(parts) + f"; non-inferiority needs each CI's lower end >= -{coverage_margin:.4f}: passes")
    return GateVerdict("coverage_maximised", not problems, message, figures)


def lambda2_grid(lambda2: float | None, n_grid: int = 101) -> np.ndarray:
    """Increasing lambda2 values in [0, 1] (the deployed one included) to check the sets' nesting on."""
    return np.unique(np.concatenate([np.linspace(0.0, 1.0, n_grid), [] if lambda2 is None else [float(lambda2)]]))


def check_prediction_sets_valid(
    sets_by_lambda2: np.ndarray, q: np.ndarray, g: np.ndarray, lambda1: float | None, lambda2: float | None,
    exits: np.ndarray, positive_set_coverage: Mapping[str, Any], target: float,
) -> GateVerdict:
    """Prediction sets on val_test: nested in lambda2, singleton sets exactly the exits, and the set coverage
    of selected positives not significantly below the target ``1 - target_fnr`` the sets were built for
    (its bootstrap CI reaches the target).

    ``sets_by_lambda2`` [k, N, 2]: the deployed code's set memberships at increasing lambda2
    (:func:`lambda2_grid`); ``q``, ``g``: calibrated outputs, from which "selected with a singleton
    set" is recomputed plainly and compared with the deployed ``exits``.
    """
    members = np.asarray(sets_by_lambda2, dtype=bool)
    grid = members.shape[0]
    not_nested = int(np.sum(members[:-1] & ~members[1:]))
    recomputed, _, _ = scrc_exits_plain(g, q, lambda1, lambda2)
    exits = np.asarray(exits, dtype=bool)
    mismatched = int(np.sum(recomputed != exits))
    value, lo, hi = (positive_set_coverage.get(k) for k in ("value", "ci_lower", "ci_upper"))
    problems = []
    if lambda1 is None or lambda2 is None:
        problems.append("no thresholds: the policy exits nothing, so it builds no prediction set")
    if not_nested:
        problems.append(f"{not_nested} set memberships are lost when lambda2 grows (sets must be nested)")
    if mismatched:
        problems.append(f"{mismatched} samples where 'selected with a singleton set' and 'exited' disagree")
    if value is None:
        problems.append("no selected positive on val_test: the set coverage is undefined")
    elif hi < target - 1e-12:
        problems.append(f"set coverage of selected positives {value:.4f} is significantly below the target "
                        f"{target:.4f} (bootstrap CI [{lo:.4f}, {hi:.4f}])")
    message = "; ".join(problems) or (
        f"sets nested over {grid} values of lambda2; singleton sets are exactly the {int(exits.sum())} exits; "
        f"set coverage of selected positives {value:.4f} (CI [{lo:.4f}, {hi:.4f}]) vs target {target:.4f}")
    return GateVerdict("prediction_sets_valid", not problems, message,
                       {"lambda2_grid": int(grid), "not_nested": not_nested, "singleton_exit_mismatches": mismatched,
                        "n_exits": int(exits.sum()), "set_coverage": value, "set_coverage_ci_lower": lo,
                        "set_coverage_ci_upper": hi, "target": float(target),
                        "target_within_ci": None if value is None else bool(lo <= target <= hi)})


# ----- readers ---------------------------------------------------------------------------


@reader("risk_training_works")
def _risk_training_works(ctx: StepContext) -> GateVerdict:
    from stage1_core.steps.backbone import previous_backbone_phase
    from stage1_core.steps.training import load_split_outputs

    evaluation_record(ctx)
    training = read_training(ctx.layout, ctx.partition)
    previous = previous_backbone_phase(ctx.layout, ctx.partition)
    ctx.require("evaluation-check", [("predictions", previous), ("checkpoint", previous)])
    current = val_test_outcomes(ctx, ctx.partition)
    outputs = {split: load_split_outputs(ctx.layout, previous, split) for split in ("val_select", "val_calib", "val_test")}
    if not np.array_equal(outputs["val_test"].labels, current["labels"]):
        raise ValueError(f"{previous}'s val_test predictions are not of {ctx.partition}'s val_test images: "
                         f"re-materialise its predictions on the current splits")
    ablation = ablation_exits(ctx.cfg, outputs, read_training(ctx.layout, previous)["checkpoint_id"])
    return check_risk_training_works(training["history"], bool(training["losses_finite"]), current["exit"], ablation,
                                     f"{previous}'s checkpoint, same SCRC fit", float(ctx.cfg.coverage_margin),
                                     bootstrap_settings(ctx))


@reader("coverage_maximised")
def _coverage_maximised(ctx: StepContext) -> GateVerdict:
    from stage1_core.artifacts import load_tensors
    from stage1_core.steps.training import load_prediction_outputs

    comparison = scrc_comparison(ctx)
    doc, policy = scrc_policy(ctx)
    probs, raw, labels = load_prediction_outputs(ctx.layout, ctx.partition, "val_calib")
    q, g = policy.calibrated(probs, raw)
    if doc["scrc_variant"] == "SCRC-I":
        recomputed = recompute_scrc_inductive(doc, g, q, labels)
    else:
        t_probs, t_raw, _ = load_prediction_outputs(ctx.layout, ctx.partition, "val_test")
        q_t, g_t = policy.calibrated(t_probs, t_raw)
        exits = load_tensors(ctx.layout.path("evaluation", ctx.partition) / DECISIONS_FILE)["exit"].numpy()
        recomputed = recompute_scrc_transductive(doc, g, q, labels, g_t, q_t, exits)
    return check_coverage_maximised(recomputed, comparison, float(ctx.cfg.coverage_margin))


@reader("prediction_sets_valid")
def _prediction_sets_valid(ctx: StepContext) -> GateVerdict:
    from stage1_core.artifacts import load_tensors
    from stage1_core.steps.training import load_prediction_outputs

    comparison = scrc_comparison(ctx)
    _, policy = scrc_policy(ctx)
    probs, raw, _ = load_prediction_outputs(ctx.layout, ctx.partition, "val_test")
    q, g = policy.calibrated(probs, raw)
    exits = load_tensors(ctx.layout.path("evaluation", ctx.partition) / DECISIONS_FILE)["exit"].numpy()
    from stage1_core.calibration.scrc import prediction_sets

    sets = comparison["sets"]
    members = np.stack([prediction_sets(q, lam) for lam in lambda2_grid(comparison["lambda2"])])
    return check_prediction_sets_valid(members, q, g, comparison["lambda1"], comparison["lambda2"], exits,
                                             sets["positive_set_coverage"], sets["positive_set_coverage_target"])
