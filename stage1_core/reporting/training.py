"""Training curves from the per-epoch log (loss, accuracy and, when logged, AUGRC and the coverage
certified on val_select)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stage1_core.artifacts import atomic_write_bytes  # noqa: E402


def plot_training_curves(history: Sequence[dict[str, Any]], out_path: str | Path) -> Path:
    """Loss and accuracy per epoch (train vs val_select); AUGRC and certified coverage on panels of
    their own when logged."""
    epochs = [int(row["Epoch"]) for row in history]
    extra = [(column, title, colour) for column, title, colour in (
        ("AUGRC", "AUGRC on val_select (lower is better)", "tab:red"),
        ("Certified_Coverage", "coverage certified on val_select", "tab:green"),
    ) if any(row.get(column) is not None for row in history)]
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(4.5 * (2 + len(extra)), 3.4))
    panels = [("loss", "Train_Loss", "Val_Loss"), ("accuracy", "Train_Acc", "Val_Acc")]
    for ax, (title, train_key, val_key) in zip(axes, panels):
        ax.plot(epochs, [row.get(train_key) for row in history], marker="o", label="train")
        ax.plot(epochs, [row.get(val_key) for row in history], marker="o", label="val_select (EMA)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, (column, title, colour) in zip(axes[2:], extra):
        ax.plot(epochs, [row.get(column) for row in history], marker="o", color=colour)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out_path, buffer.getvalue())


def plot_step_trace(grad_norms: Sequence[float], step_losses: Sequence[float], out_path: str | Path) -> Path:
    """Gradient norm (before clipping) and mean training loss of every optimiser step."""
    steps = list(range(1, len(grad_norms) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(steps, list(grad_norms), lw=0.8)
    axes[0].set_title("gradient norm per step (before clipping)")
    axes[0].set_yscale("log" if grad_norms and min(grad_norms) > 0 else "linear")
    axes[1].plot(list(range(1, len(step_losses) + 1)), list(step_losses), lw=0.8, color="tab:orange")
    axes[1].set_title("training loss per step")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out_path, buffer.getvalue())
