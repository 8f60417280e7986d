"""Evaluation figures (matplotlib, Agg backend): risk-coverage with a bootstrap band,
reliability diagram, and the certification sweep. Every PNG is written atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..artifacts import atomic_write_bytes  # noqa: E402
from ..metrics import bootstrap as bs  # noqa: E402
from ..metrics.calibration import bin_edges, compute_ece, reliability_bins  # noqa: E402
from ..metrics.selective import augrc, risk_coverage_curve  # noqa: E402

__all__ = ["plot_risk_coverage", "plot_reliability", "plot_threshold_sweep", "plot_exit_bootstrap"]

_DPI = 120


def _save(fig: plt.Figure, out_path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(out_path, buffer.getvalue())


def plot_risk_coverage(
    confidence,
    residuals,
    out_path: str | Path,
    *,
    n_bootstrap: int = 200,
    band_confidence: float = 0.95,
    seed: int = 0,
    n_grid: int = 50,
    operating_coverage: float | None = None,
    title: str = "Risk-coverage (val_test)",
) -> Path:
    """Selective risk vs coverage, with the percentile-bootstrap band of Risk@Coverage on a grid."""
    curve = risk_coverage_curve(confidence, residuals)
    grid = np.linspace(1.0 / n_grid, 1.0, n_grid)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if n_bootstrap > 0:
        stat = bs.selective_statistic(confidence, residuals, coverages=grid, risks=())
        boot = bs.bootstrap(stat, curve.n, n_resamples=n_bootstrap, confidence=band_confidence, seed=seed)
        lo = np.array([boot[f"risk@{c:g}"].ci_lower for c in grid])
        hi = np.array([boot[f"risk@{c:g}"].ci_upper for c in grid])
        ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.2, step="pre",
                        label=f"{band_confidence:.0%} bootstrap band ({n_bootstrap} resamples)")
    ax.step(curve.coverages, curve.selective_risks, where="post", color="tab:blue",
            label=f"selective risk (AUGRC {augrc(confidence, residuals):.4f})")
    if operating_coverage is not None:
        ax.axvline(operating_coverage, color="tab:red", linestyle="--",
                   label=f"exit policy coverage {operating_coverage:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction accepted)")
    ax.set_ylabel("selective risk (error rate among accepted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, out_path)


def plot_reliability(probs, labels, out_path: str | Path, *, n_bins: int = 10,
                     title: str = "Reliability (val_test)") -> Path:
    """Accuracy vs mean confidence per bin (the bins of :func:`compute_ece`), with bin counts."""
    counts, acc, mean_conf = reliability_bins(probs, labels, n_bins)
    filled = counts > 0
    acc[filled] /= counts[filled]
    mean_conf[filled] /= counts[filled]
    edges = bin_edges(n_bins)
    width = edges[1] - edges[0]

    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.6, 6.4), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(edges[:-1][filled], acc[filled], width=width, align="edge", color="tab:blue",
           edgecolor="black", alpha=0.8, label="accuracy")
    ax.bar(edges[:-1][filled], np.abs(mean_conf - acc)[filled], bottom=np.minimum(acc, mean_conf)[filled],
           width=width, align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//",
           label="gap |accuracy - mean confidence|")
    ax.scatter(mean_conf[filled], mean_conf[filled], marker="D", s=18, color="black", zorder=3,
               label="mean confidence of bin")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {compute_ece(probs, labels, n_bins):.4f}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_count.bar(edges[:-1], counts, width=width, align="edge", color="gray", edgecolor="black")
    ax_count.set_yscale("log" if counts.max() > 50 * max(1, counts[filled].min()) else "linear")
    ax_count.set_xlabel("confidence (max probability)")
    ax_count.set_ylabel("count")
    ax_count.grid(alpha=0.3)
    return _save(fig, out_path)


def _as_mapping(result: Any) -> Mapping[str, Any]:
    if isinstance(result, Mapping):
        return result
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise TypeError(f"expected a CertificationResult or thresholds.json dict, got {type(result).__name__}")


def plot_threshold_sweep(certification_result: Any, target_fnr: float, out_path: str | Path, *,
                         title: str = "Exit threshold sweep (val_calib)") -> Path:
    """Coverage and FNR_on_exited (with its upper bound) vs threshold, target and chosen threshold.

    Accepts a :class:`~stage1_core.calibration.threshold_sweep.CertificationResult` or the
    ``thresholds.json`` dict.
    """
    res = _as_mapping(certification_result)
    sweep = res["sweep_results"]
    if not sweep:
        raise ValueError("the certification result has no sweep_results to plot")
    t = np.array([r["threshold"] for r in sweep])
    cov = np.array([r["coverage"] for r in sweep])
    fnr = np.array([np.nan if r["fnr_on_exits"] is None else r["fnr_on_exits"] for r in sweep])
    bound = np.array([r["fnr_upper_bound"] for r in sweep])
    certified = np.array([r["certified"] for r in sweep], dtype=bool)

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    ax_fnr = ax.twinx()
    ax.plot(t, cov, color="tab:blue", label="coverage")
    ax_fnr.plot(t, fnr, color="tab:orange", linewidth=1, label="FNR on exited (empirical)")
    ax_fnr.plot(t, bound, color="tab:red", linewidth=1, linestyle=":",
                label=f"upper bound (level {res.get('test_level', float('nan')):.3g})")
    if certified.any():
        ax_fnr.scatter(t[certified], bound[certified], s=4, color="tab:green", zorder=3,
                       label="certified candidates")
    ax_fnr.axhline(target_fnr, color="black", linestyle="--", linewidth=1, label=f"target {target_fnr:g}")
    grid = res.get("grid_results") or []
    if grid:
        ax.scatter([g["threshold"] for g in grid], [g["coverage"] for g in grid], marker="x",
                   color="tab:purple", zorder=3, label="seed grid (comparison only)")
    chosen = res.get("exit_threshold")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", linewidth=1.5,
                   label=f"chosen t = {chosen:.4f} (coverage {res['coverage']:.3f})")
        verdict = f"certified by {res.get('method')}"
    else:
        verdict = "nothing certified: exits nothing"
    ax.set_xlabel("exit threshold t (exit iff max p >= t)")
    ax.set_ylabel("coverage on val_calib")
    ax.set_ylim(0, 1.02)
    ax_fnr.set_ylabel("FNR on exited positives")
    ax_fnr.set_ylim(0, max(3 * target_fnr, float(np.nanmax(np.r_[fnr[cov > 0.05], target_fnr])) * 1.1))
    ax.set_xlim(0.5, 1.0)
    ax.set_title(f"{title}: {verdict}")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    handles_fnr = ax_fnr.get_legend_handles_labels()
    ax.legend(handles[0] + handles_fnr[0], handles[1] + handles_fnr[1], loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    return _save(fig, out_path)


def plot_exit_bootstrap(
    distribution: Mapping[str, np.ndarray],
    point: Mapping[str, float],
    out_path: str | Path,
    *,
    target_fnr: float,
    confidence: float = 0.95,
    title: str = "Bootstrap distributions on val_test",
) -> Path:
    """Histograms of FNR on exited samples and of coverage over the bootstrap resamples.

    ``distribution`` holds ``fnr_on_exited`` and ``coverage`` per resample (NaN where a resample
    has no exited positive), ``point`` their estimates on the full set. The percentile interval
    is shaded and ``target_fnr`` marked, so the spread behind the reported interval is visible.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8))
    alpha = (1.0 - confidence) / 2.0
    for ax, key, label, colour in ((axes[0], "fnr_on_exited", "FNR on exited samples", "tab:red"),
                                   (axes[1], "coverage", "coverage (fraction exited)", "tab:blue")):
        values = np.asarray(distribution[key], dtype=np.float64)
        defined = values[~np.isnan(values)]
        if defined.size:
            lo, hi = np.percentile(defined, [100 * alpha, 100 * (1 - alpha)])
            ax.hist(defined, bins=min(40, max(5, int(np.sqrt(defined.size)))), color=colour, alpha=0.6)
            ax.axvspan(lo, hi, color=colour, alpha=0.12, label=f"{confidence:.0%} interval [{lo:.4f}, {hi:.4f}]")
        ax.axvline(point[key], color="black", linestyle="-", label=f"estimate {point[key]:.4f}")
        if key == "fnr_on_exited":
            ax.axvline(target_fnr, color="tab:red", linestyle="--", label=f"target {target_fnr:g}")
        undefined = values.size - defined.size
        note = f", {undefined} undefined" if undefined else ""
        ax.set_title(f"{label}\n{defined.size} resamples{note}", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("resamples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, out_path)
