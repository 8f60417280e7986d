"""Training curves from the per-epoch log (loss, accuracy and, when logged, AUGRC on val_select)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stage1_core.artifacts import atomic_write_bytes  # noqa: E402


def plot_training_curves(history: Sequence[dict[str, Any]], out_path: str | Path) -> Path:
    """Loss and accuracy per epoch (train vs val_select); AUGRC on a third panel when present."""
    epochs = [int(row["Epoch"]) for row in history]
    has_augrc = any(row.get("AUGRC") is not None for row in history)
    fig, axes = plt.subplots(1, 3 if has_augrc else 2, figsize=(12 if has_augrc else 9, 3.4))
    panels = [("loss", "Train_Loss", "Val_Loss"), ("accuracy", "Train_Acc", "Val_Acc")]
    for ax, (title, train_key, val_key) in zip(axes, panels):
        ax.plot(epochs, [row.get(train_key) for row in history], marker="o", label="train")
        ax.plot(epochs, [row.get(val_key) for row in history], marker="o", label="val_select (EMA)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if has_augrc:
        ax = axes[2]
        ax.plot(epochs, [row.get("AUGRC") for row in history], marker="o", color="tab:red")
        ax.set_title("AUGRC on val_select (lower is better)")
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
