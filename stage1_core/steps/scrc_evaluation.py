"""Phase-6 evaluation extras: SCRC next to its special cases (gate, softmax) on the same checkpoint.

On val_test only, with the deployed SCRC decisions (made by the bundle's predictor object): the
coverage, exit accuracy and FNR on exits of SCRC and of the gate policy (g >= t) and the softmax
policy (max q >= t) certified on the same calibrated scores, paired bootstrap CIs of SCRC's
coverage gain over each, and the stage-2 set statistics (singleton / {0,1} / empty rates over
the selected samples, empirical set coverage, and the set coverage of selected positives - the
quantity the sets are built to keep >= 1 - target - with its bootstrap CI). Figures: the certified
frontier, the three policies' coverage, and FNR on exits vs coverage for g and max q.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stage1_core.steps.gate_evaluation import _exit_summary, paired_bootstrap_difference


def bootstrap_mean_ci(values: np.ndarray, n_resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Mean of ``values`` with a percentile bootstrap CI (multinomial counts, vectorised); None when empty."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        return {"value": None, "ci_lower": None, "ci_upper": None, "n": 0, "n_resamples": int(n_resamples)}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(v.size, np.full(v.size, 1.0 / v.size), size=n_resamples)
    means = counts @ v / v.size
    alpha = (1.0 - confidence) / 2.0
    return {"value": float(v.mean()), "ci_lower": float(np.quantile(means, alpha)),
            "ci_upper": float(np.quantile(means, 1.0 - alpha)), "n": int(v.size), "n_resamples": int(n_resamples)}


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


def scrc_comparison(
    policy_doc: dict[str, Any],
    decisions: Any,
    labels: np.ndarray,
    cfg: Any,
    out_dir: Path,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Numbers and figures comparing the deployed SCRC decisions with its certified special cases on val_test."""
    from stage1_core.reporting.exit_figures import plot_fnr_coverage
    from stage1_core.reporting.scrc_figures import plot_policy_coverage, plot_scrc_frontier

    q = np.asarray(decisions.probs, dtype=float)
    g = np.asarray(decisions.gate_score, dtype=float)
    answers = q.argmax(1)
    scrc_exits = np.asarray(decisions.exit, dtype=bool)
    special = special_case_exits(policy_doc, q, g)
    summary: dict[str, Any] = {
        "variant": policy_doc["scrc_variant"],
        "lambda1": decisions.lambda1,
        "lambda2": decisions.lambda2,
        "reason": decisions.reason,
        "scrc": {**_exit_summary(scrc_exits, np.asarray(decisions.label), labels),
                 "certified_coverage": float(policy_doc["coverage"])},
    }
    bars = {}
    for name, exits in (("scrc", scrc_exits), *special.items()):
        ci = bootstrap_mean_ci(exits.astype(float), cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
        certified = policy_doc["coverage"] if name == "scrc" else policy_doc["special_cases"][name]["coverage"]
        bars[name] = {"coverage": ci["value"], "ci_lower": ci["ci_lower"], "ci_upper": ci["ci_upper"],
                      "certified_coverage": float(certified)}
        if name != "scrc":
            summary[name] = {**_exit_summary(exits, answers, labels),
                             "exit_threshold": policy_doc["special_cases"][name]["exit_threshold"],
                             "certified_coverage": float(certified)}
            summary[f"coverage_gain_vs_{name}"] = paired_bootstrap_difference(
                scrc_exits, exits, cfg.bootstrap_samples, cfg.bootstrap_confidence, cfg.seed)
    summary["sets"] = set_summary(decisions, labels, float(policy_doc["target_fnr"]), cfg)
    figures = {
        "SCRC certified frontier (val_calib)": plot_scrc_frontier(policy_doc, out_dir / "scrc_frontier.png"),
        "coverage of SCRC, gate and softmax policies (val_test)": plot_policy_coverage(
            bars, out_dir / "policy_coverage.png"),
        "FNR on exits vs coverage, gate and softmax scores (val_test)": plot_fnr_coverage(
            {"calibrated gate g": (g, answers), "calibrated max q": (q.max(1), answers)}, labels,
            float(policy_doc["target_fnr"]), out_dir / "scores_fnr_coverage.png",
            operating={"calibrated gate g": summary["gate"]["coverage"],
                       "calibrated max q": summary["softmax"]["coverage"]}),
    }
    return summary, figures
