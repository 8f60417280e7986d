"""Training checkpoints: the baseline's dict plus what an exact resume needs.

A full checkpoint holds the baseline keys ``epoch`` (0-based index of the last finished epoch),
``model_state_dict``, ``optimizer_state_dict``, ``scheduler_state_dict``, ``best_acc`` (best
val_select accuracy so far, in percent as the baseline printed it), ``patience_counter`` and,
with EMA, ``ema_state_dict`` (the shadow, name -> tensor); and in addition ``config`` (plain
dict), ``rng_states`` (see :mod:`stage1_core.training.seeding`), ``global_step`` (optimiser
steps), ``best_metric``, ``best_epoch``, ``selection_metric``, ``history`` (one dict per epoch),
``ema_num_updates``, ``scaler_state_dict``, ``stopped_early``, ``losses_finite`` and
``format_version``. Everything is tensors or plain Python values, so it loads with
``torch.load(weights_only=True)``; writes are atomic.

``model_best.pth`` (what bundles ship) is a plain head state_dict: see :func:`save_state_dict`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from stage1_core.artifacts import ArtifactError, atomic_write_bytes, load_tensors

FORMAT_VERSION = 1
BASELINE_KEYS = (
    "epoch",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "best_acc",
    "patience_counter",
)
EXTRA_KEYS = ("config", "rng_states", "global_step", "best_metric", "history")
REQUIRED_KEYS = BASELINE_KEYS + EXTRA_KEYS


class CheckpointError(ArtifactError):
    """A checkpoint file is missing, unreadable, truncated or lacks keys; the message names the file."""


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> Path:
    """Write a full checkpoint atomically after checking it has every required key."""
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: refusing to write a checkpoint without keys {missing}")
    data = dict(checkpoint)
    data.setdefault("format_version", FORMAT_VERSION)
    return atomic_write_bytes(path, _to_bytes(data))


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write a plain state_dict (detached CPU tensors) atomically."""
    plain = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    return atomic_write_bytes(path, _to_bytes(plain))


def _load(path: Path) -> Any:
    return load_tensors(path, error=CheckpointError)


def load_checkpoint(path: str | Path, required_keys: Iterable[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load a full checkpoint with ``weights_only=True``; raise :class:`CheckpointError` naming
    the file and every missing key."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(data).__name__}")
    missing = [k for k in required_keys if k not in data]
    if missing:
        hint = (
            " (a checkpoint of the old script lacks config/rng_states/global_step/history: it cannot be "
            "resumed exactly; start a new run and load its weights with load_head_state_dict)"
            if all(k in data for k in BASELINE_KEYS)
            else ""
        )
        raise CheckpointError(f"{path}: checkpoint lacks keys {missing}{hint}")
    return data


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict (``model_best.pth``) with ``weights_only=True``.

    A full checkpoint is accepted too: its ``model_state_dict`` is returned.
    """
    path = Path(path)
    data = _load(path)
    if isinstance(data, dict) and "model_state_dict" in data and isinstance(data["model_state_dict"], dict):
        data = data["model_state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state_dict (names -> tensors), found {type(data).__name__}")
    return data
