"""Phase-6 figures: SCRC's certified (lambda1, lambda2) frontier and the coverage of its policies.

``plot_scrc_frontier`` reads ``scrcparams.json`` (val_calib): the tested candidate sequence as
coverage vs its FNR upper bound, and the same candidates in the (lambda1, lambda2) plane, with
the deployed pair and SCRC's special cases (gate, softmax) marked. ``plot_policy_coverage`` puts
the val_test coverage of the three certified policies side by side with bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .figures import _save  # noqa: E402

__all__ = ["plot_scrc_frontier", "plot_policy_coverage"]


def plot_scrc_frontier(doc: Mapping[str, Any], out_path: str | Path) -> Path:
    """Two panels from an ``scrcparams.json`` document (see the module docstring)."""
    rows = list(doc.get("sweep_results") or [])
    n = max(int(doc.get("n_calib") or 1), 1)
    target = float(doc["target_fnr"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    if rows:
        cov = np.array([r["n_exited"] / n for r in rows])
        bound = np.array([r["fnr_upper_bound"] for r in rows])
        l1 = np.array([r["lambda1"] for r in rows])
        l2 = np.array([r["lambda2"] for r in rows])
        tested = np.array([r["tested"] for r in rows], dtype=bool)
        certified = np.array([r["certified"] for r in rows], dtype=bool)
        for mask, style, label in ((~tested, dict(color="0.75", s=8), "not tested"),
                                   (tested & ~certified, dict(color="tab:red", s=14), "tested, not certified"),
                                   (certified, dict(color="tab:green", s=14), "certified")):
            left.scatter(cov[mask], bound[mask], label=label, **style)
            right.scatter(l1[mask], l2[mask], **style)
    if doc.get("lambda1") is not None:
        left.scatter([doc["coverage"]], [doc["fnr_bound"]], marker="*", s=180, color="black", label="deployed", zorder=5)
        right.scatter([doc["lambda1"]], [doc["lambda2"]], marker="*", s=180, color="black", zorder=5)
    for name, marker in (("gate", "s"), ("softmax", "^")):
        case = (doc.get("special_cases") or {}).get(name)
        if case and case.get("certified"):
            left.scatter([case["coverage"]], [case["fnr_upper_bound"]], marker=marker, s=60, facecolors="none",
                         edgecolors="tab:blue", label=f"{name} policy (special case)", zorder=4)
    left.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    left.set_xlabel("coverage on val_calib")
    left.set_ylabel("FNR on exits, upper bound at the test level")
    left.set_ylim(0, min(1.0, max(4 * target, 0.08)))
    left.set_xlim(0, 1)
    left.set_title(f"{doc.get('scrc_variant', 'SCRC')}: tested candidates (val_calib)")
    left.legend(fontsize=7, loc="upper left")
    left.grid(alpha=0.3)
    right.set_xlabel("lambda1 (calibrated gate score threshold)")
    right.set_ylabel("lambda2 (set threshold: C = {y: q_y >= 1 - lambda2})")
    right.set_title("candidates in the (lambda1, lambda2) plane")
    right.grid(alpha=0.3)
    if not rows:
        right.text(0.5, 0.5, "no candidate sequence recorded" if doc.get("scrc_variant") == "SCRC-I"
                   else "SCRC-T: thresholds are recomputed per batch", ha="center", va="center",
                   transform=right.transAxes, fontsize=9)
    return _save(fig, out_path)


def plot_policy_coverage(comparison: Mapping[str, Any], out_path: str | Path,
                         title: str = "Coverage of the certified policies (val_test)") -> Path:
    """Bars: val_test coverage of SCRC and its special cases, with percentile bootstrap intervals.

    ``comparison`` maps a policy name to ``{"coverage", "ci_lower", "ci_upper"}`` and optionally
    ``"certified_coverage"`` (val_calib, drawn as a marker).
    """
    names = list(comparison)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    x = np.arange(len(names))
    values = np.array([float(comparison[k]["coverage"]) for k in names])
    lo = np.array([float(comparison[k].get("ci_lower", comparison[k]["coverage"])) for k in names])
    hi = np.array([float(comparison[k].get("ci_upper", comparison[k]["coverage"])) for k in names])
    ax.bar(x, values, color=["tab:green", "tab:blue", "tab:orange", "tab:gray"][: len(names)], alpha=0.8,
           yerr=np.vstack([values - lo, hi - values]), capsize=4, label="val_test (95% bootstrap CI)")
    calib = [comparison[k].get("certified_coverage") for k in names]
    if any(c is not None for c in calib):
        ax.scatter(x, [np.nan if c is None else c for c in calib], marker="_", s=400, color="black",
                   label="certified on val_calib", zorder=5)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("coverage (fraction exited)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)
