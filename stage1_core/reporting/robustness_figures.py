"""Bar charts of the per-level robustness report (val_test through each challenge level)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .figures import _save  # noqa: E402

__all__ = ["plot_robustness"]


def plot_robustness(rows: Sequence[dict[str, Any]], target_fnr: float, out_path: str | Path) -> Path:
    """Coverage, FNR on exits (with its Clopper-Pearson bound), accuracy of round(p) and reward per view."""
    names = [r["view"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    panels = [
        ("coverage (deploy prior)", [r["coverage_at_deploy_prior"] for r in rows]),
        ("FNR on exits", [np.nan if r["fnr_on_exits"] is None else r["fnr_on_exits"] for r in rows]),
        ("accuracy of round(p) (deploy prior)", [r["accuracy_round_p"] for r in rows]),
        ("simulated reward", [r["reward"] for r in rows]),
    ]
    for ax, (title, values) in zip(axes, panels):
        colours = ["tab:red" if r.get("significantly_above_target") else "tab:blue" for r in rows]
        ax.bar(x, values, color=colours)
        if title == "FNR on exits":
            upper = np.array([r["fnr_upper_bound"] for r in rows]) - np.nan_to_num(np.array(values, dtype=float))
            ax.errorbar(x, np.nan_to_num(np.array(values, dtype=float)), yerr=[np.zeros(len(rows)), upper],
                        fmt="none", ecolor="black", capsize=3, label="one-sided CP bound")
            ax.axhline(target_fnr, color="tab:red", linestyle="--", label=f"target {target_fnr:g}")
            ax.legend(fontsize=7)
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle("val_test per challenge level (red: FNR significantly above target, Holm-corrected)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)
