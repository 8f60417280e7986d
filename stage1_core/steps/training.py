"""Training and prediction steps: train the recipe's head, then predict with its best checkpoint.

Phase-agnostic: the recipe (``phases.py``) names the head kind and the loss; the loss is built
by :func:`stage1_core.training.recipes.build_loss`. ``train`` fits weights, ``val_select``
selects the checkpoint; predictions come from the *best* checkpoint, never the last epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stage1_core.artifacts import jsonable, load_tensors, save_tensors, sha256_file, write_json
from stage1_core.config import Stage1ProConfig
from stage1_core.data.splits import VAL_SPLITS, require_role
from stage1_core.distributed import env
from stage1_core.phases import get_recipe
from stage1_core.steps.backbone import load_split
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.data import read_splits
from stage1_core.store import PREDICTIONS_FILE, TRAINING_FILE, read_backbone, read_training

if TYPE_CHECKING:
    from stage1_core.policies.base import SplitOutputs


def runtime_environment() -> dict[str, Any]:
    """What makes results differ across machines (recorded next to every trained artifact)."""
    import platform

    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "world_size": env.world_size(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "python": platform.python_version(),
    }


def train_phase(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Train the phase's model; select on val_select only.

    ``train_mode == "cached"``: the head trains on cached train features. ``"finetune"``: the
    same cached training first (the linear-probe stage), then adapters and heads together on
    images (:mod:`stage1_core.training.finetune`); the checkpoint then also holds the merged
    fine-tuned backbone, which predictions and the bundle use.
    """
    ctx = StepContext(config, layout, partition)
    recipe = get_recipe(partition)
    wanted = [("cached_features", partition), ("splits", None), ("dataset_index", None)]
    if recipe.warm_start:
        from stage1_core.steps.backbone import previous_backbone_phase

        wanted.append(("checkpoint", previous_backbone_phase(layout, partition)))
    inputs = ctx.require("checkpoint", wanted)
    cfg = ctx.cfg
    out_dir = layout.dir("checkpoint", partition)
    result, extra, tables = fit_phase(cfg, layout, partition)
    checkpoint_id = _checkpoint_id(result, extra)
    history = [log_row(record) for record in result.history]
    best_row = next(row for row in history if row["Epoch"] == int(result.best_epoch))
    summary = {
        "phase": partition,
        "head_kind": recipe.head_kind,
        "loss_kind": recipe.loss_kind,
        "train_mode": recipe.train_mode,
        "optimizer": cfg.optimizer,
        "selection_metric": cfg.selection_metric,
        "best_epoch": int(result.best_epoch),
        "best_metric": float(result.best_metric),
        "best_val_accuracy": float(best_row["Val_Acc"]),
        "epochs_run": int(result.epochs_run),
        "stopped_early": bool(result.stopped_early),
        "losses_finite": bool(result.losses_finite),
        "checkpoint_id": checkpoint_id,
        "best_checkpoint": Path(result.best_checkpoint).relative_to(out_dir).as_posix(),
        "log_csv": Path(result.log_csv).relative_to(out_dir).as_posix(),
        "environment": runtime_environment(),
        "memory": {"peak_rss_gb": result.peak_rss_gb, "peak_cuda_gb": result.peak_cuda_gb,
                   "budget_gb": float(cfg.memory_budget_gb), "device_memory_gb": result.device_memory_gb,
                   "warning": result.memory_warning},
        "checkpoint_sizes": checkpoint_sizes(out_dir),
        "loss_spike_factor": float(cfg.loss_spike_factor),
        "grad_norms": [float(v) for v in result.grad_norms],
        "step_losses": [float(v) for v in result.step_losses],
        "history": history,
        **extra,
    }
    cfg.save(out_dir / "config.json")
    path = write_json(out_dir / TRAINING_FILE, summary, schema="training")
    figures = {"training curves": _plot_training(history, out_dir / "training_curves.png"),
               "gradient norm per step": _plot_grad_norms(summary, out_dir / "grad_norms.png")}
    files = [summary["best_checkpoint"], TRAINING_FILE]
    if recipe.train_mode == "finetune":
        tuned_dir = extra["finetuned_backbone"]["directory"]
        files += [f"{tuned_dir}/{name}" for name in _model_files(out_dir / tuned_dir)]
    record = ctx.finish("checkpoint", files, inputs, id_parts={"model_best": checkpoint_id})
    metadata = {k: v for k, v in summary.items()
                if k not in ("history", "environment", "grad_norms", "step_losses", "peft", "memory")}
    metadata.update(path=Path(result.best_checkpoint), lineage_id=record.id, peak_rss_gb=result.peak_rss_gb,
                    max_grad_norm_seen=max(result.grad_norms) if result.grad_norms else None)
    if "peft" in extra:
        metadata.update(peft_trainable_fraction=extra["peft"]["init"]["trainable_fraction"],
                        peft_merged_max_abs_diff=extra["peft"]["final"].get("merged_max_abs_diff"),
                        peft_init_max_abs_diff=extra["peft"]["init"]["init_max_abs_diff"])
    return StepResult(path, metadata, tables={"history": history, **tables}, figures=figures, record=record)


def fit_phase(cfg: Stage1ProConfig, layout: Layout, partition: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Train the phase's models into ``checkpoint[partition]``: ``(train result, extra summary, tables)``.

    Every rank of a ``torchrun`` job calls this (rank 0 from :func:`train_phase`); the trainers
    share the work and rank 0 writes the files.
    """
    from stage1_core.training.recipes import build_loss
    from stage1_core.training.trainer import train_head

    recipe = get_recipe(partition)
    warm_from = None
    if recipe.warm_start:
        from stage1_core.steps.backbone import previous_backbone_phase

        warm_from = previous_backbone_phase(layout, partition)
    splits, _ = read_splits(layout)
    train = load_split(layout, partition, "train")
    val_select = load_split(layout, partition, "val_select")
    require_role(train.sample_ids, "fit", splits, f"{partition}'s training rows")  # by content, not by name
    require_role(val_select.sample_ids, "select", splits, f"{partition}'s checkpoint-selection rows")
    from stage1_core.steps.deployment import training_views

    views = training_views(layout, partition)  # challenge views of each training image (pipeline on)
    if views:
        from stage1_core.data.views import MultiViewSplit

        train = MultiViewSplit.of(train, views)
    out_dir = layout.dir("checkpoint", partition)
    loss_fn = build_loss(recipe.loss_kind, cfg, train.labels)
    with_gate = recipe.head_kind == "gated"
    probe_dir = out_dir / PROBE_DIR if recipe.train_mode == "finetune" else out_dir
    init_head_state = None
    extra: dict[str, Any] = {}
    if warm_from is not None:
        from stage1_core.training.checkpoints import load_state_dict_file

        warm = read_training(layout, warm_from)
        init_head_state = load_state_dict_file(layout.path("checkpoint", warm_from) / warm["best_checkpoint"])
        extra["warm_start"] = {"phase": warm_from, "checkpoint_id": warm["checkpoint_id"]}
    result = train_head(cfg, train, val_select, probe_dir, selection_metric=cfg.selection_metric, progress=True,
                        loss_fn=loss_fn, with_gate=with_gate, init_head_state=init_head_state)
    _require_best(result, partition)
    tables: dict[str, list[dict[str, Any]]] = {}
    if recipe.train_mode == "finetune":
        from stage1_core.training.checkpoints import load_state_dict_file
        from stage1_core.training.finetune import finetune

        probe = {"best_epoch": int(result.best_epoch), "best_metric": float(result.best_metric),
                 "best_val_accuracy": float(result.best_val_accuracy), "epochs_run": int(result.epochs_run)}
        splits, index = read_splits(layout)
        backbone_dir = read_backbone(layout, partition)["directory"]
        from stage1_core.steps.deployment import finetune_deployment

        tuned = finetune(cfg, backbone_dir, [index.by_id[i] for i in splits.ids["train"]],
                         [index.by_id[i] for i in splits.ids["val_select"]], out_dir,
                         init_head_state=load_state_dict_file(result.best_checkpoint),
                         loss_fn=build_loss(recipe.loss_kind, cfg, train.labels),
                         deployment=finetune_deployment(layout, partition))
        result = tuned.train
        _require_best(result, partition)
        extra.update({
            "linear_probe": probe,
            "finetuned_backbone": {"directory": tuned.backbone_dir.name, "fingerprint": tuned.fingerprint},
            "peft": {"type": cfg.peft_type, "r": int(cfg.peft_r), "blocks": int(cfg.peft_blocks),
                     "init": tuned.peft_init, "final": tuned.peft_final},
            "batch_size": tuned.batch_size, "oom_fallback": tuned.oom_fallback,
            "images_per_epoch": tuned.images_per_epoch,
        })
        tables["peft_modules"] = [{"module": m} for m in tuned.peft_init["adapted_modules"]]
    return result, extra, tables


PROBE_DIR = "linear_probe"


def checkpoint_sizes(out_dir: Path) -> dict[str, int]:
    """Bytes of every ``*.pth`` the training wrote under ``out_dir`` (relative path -> size)."""
    return {p.relative_to(out_dir).as_posix(): p.stat().st_size for p in sorted(Path(out_dir).rglob("*.pth"))}


def _require_best(result: Any, partition: str) -> None:
    if result.best_checkpoint is None:
        reason = "a non-finite loss in the first epoch" if not result.losses_finite else "no epoch improved on val_select"
        raise ValueError(f"training of {partition} produced no best checkpoint ({reason}); see {result.log_csv}")


def _model_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def _checkpoint_id(result: Any, extra: dict[str, Any]) -> str:
    """sha256 of the best head, and of the fine-tuned backbone's fingerprint when there is one."""
    head = sha256_file(result.best_checkpoint)
    tuned = extra.get("finetuned_backbone")
    if not tuned:
        return head
    import hashlib

    from stage1_core.lineage import canonical_json

    return hashlib.sha256(canonical_json({"head": head, "backbone": tuned["fingerprint"]}).encode("utf-8")).hexdigest()


def _plot_grad_norms(summary: dict[str, Any], out_path: Path) -> Path:
    from stage1_core.reporting.training import plot_step_trace

    return plot_step_trace(summary["grad_norms"], summary["step_losses"], out_path)


def log_row(record: dict[str, Any]) -> dict[str, Any]:
    """A trainer history record under the training-log column names, as fractions (not percent)."""
    from stage1_core.training.logging_csv import (
        BASELINE_FORMATS,
        GATE_FORMATS,
        OPERATING_POINT_FORMATS,
        SELECTIVE_PREFIX,
        selective_column,
    )

    row: dict[str, Any] = {column: record.get(key) for column, (key, _, _) in BASELINE_FORMATS.items()}
    row.update({column: record[key] for column, (key, _, _) in {**GATE_FORMATS, **OPERATING_POINT_FORMATS}.items()
                if key in record})
    row["Epoch"] = int(row["Epoch"])
    for key, value in record.items():
        if key.startswith(SELECTIVE_PREFIX):
            row[selective_column(key[len(SELECTIVE_PREFIX):])] = value
    return jsonable(row)


def _plot_training(history: list[dict[str, Any]], out_path: Path) -> Path:
    from stage1_core.reporting.training import plot_training_curves

    return plot_training_curves(history, out_path)


def load_head(layout: Layout, partition: str) -> torch.nn.Module:
    """The phase's best head in eval mode (plain state_dict, weights_only=True; gate detected)."""
    from stage1_core.training.trainer import load_head as load_head_file

    hidden = int(read_backbone(layout, partition)["hidden_size"])
    path = layout.path("checkpoint", partition) / read_training(layout, partition)["best_checkpoint"]
    return load_head_file(path, hidden)


def predict_splits(config: Stage1ProConfig, layout: Layout, partition: str) -> StepResult:
    """Logits (and gate logits) of the best checkpoint on val_select, val_calib and val_test."""
    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.policies import SoftmaxExitPolicy

    ctx = StepContext(config, layout, partition)
    inputs = ctx.require("predictions", [("checkpoint", partition), ("cached_features", partition)])
    from stage1_core.steps.backbone import ensure_features, model_features

    predictor = Stage1Predictor(load_head(layout, partition), SoftmaxExitPolicy(None))
    tuned = read_training(layout, partition).get("finetuned_backbone")
    forward_passes = 0
    if tuned:
        _, _, _, forward_passes = ensure_features(ctx.cfg, layout, layout.path("checkpoint", partition) / tuned["directory"],
                                                  tuned["fingerprint"], VAL_SPLITS)
        from stage1_core.steps.deployment import deployment_enabled, ensure_deployment_features

        if deployment_enabled(ctx.cfg):
            section = ensure_deployment_features(ctx.cfg, layout, layout.path("checkpoint", partition) / tuned["directory"],
                                                 tuned["fingerprint"], with_train=False)
            forward_passes += int(section["forward_passes"])
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for split in VAL_SPLITS:
        data = model_features(layout, partition, split)
        logits, gates = predictor.head_outputs_from_features(data.features)
        tensors[f"{split}_logits"] = torch.as_tensor(logits)
        if gates is not None:
            tensors[f"{split}_gate"] = torch.as_tensor(gates)
        labels = data.labels.numpy()
        accuracy = float((logits.argmax(1) == labels).mean())
        rows.append({"split": split, "n": int(len(labels)), "accuracy": accuracy, "sample_ids": list(data.sample_ids)})
    tensors.update(extra_view_outputs(layout, partition, predictor))  # clean and per-level views (pipeline on)
    out_dir = layout.dir("predictions", partition)
    path = save_tensors(out_dir / PREDICTIONS_FILE, tensors)
    checkpoint_id = read_training(layout, partition)["checkpoint_id"]
    write_json(out_dir / "predictions.json", {"checkpoint_id": checkpoint_id, "splits": rows,
                                              "has_gate": f"{VAL_SPLITS[0]}_gate" in tensors}, schema="predictions")
    record = ctx.finish("predictions", [PREDICTIONS_FILE, "predictions.json"], inputs)
    metadata = {"path": path, "checkpoint_id": checkpoint_id, "lineage_id": record.id,
                "finetuned_backbone_forward_passes": forward_passes,
                **{f"accuracy_{r['split']}": r["accuracy"] for r in rows}}
    table = [{k: v for k, v in r.items() if k != "sample_ids"} for r in rows]
    return StepResult(path, metadata, tables={"per_split": table}, record=record)


def extra_view_outputs(layout: Layout, partition: str, predictor: Any) -> dict[str, torch.Tensor]:
    """Head outputs on the other views, stored beside the deployed ones in predictions.pt.

    ``{split}_clean_logits`` for val_select / val_calib / val_test and ``val_test_level{L}_logits``
    per level (and ``..._gate`` for a gated head); empty without the deployment pipeline.
    """
    from stage1_core.data.challenge import LEVELS
    from stage1_core.steps.backbone import model_features
    from stage1_core.steps.deployment import LEVEL_SPLIT, deployment_section

    if deployment_section(layout, partition) is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    wanted = [(split, "clean", f"{split}_clean") for split in VAL_SPLITS]
    wanted += [(LEVEL_SPLIT, f"level{level}", f"{LEVEL_SPLIT}_level{level}") for level in LEVELS]
    for split, view, prefix in wanted:
        data = model_features(layout, partition, split, view)
        logits, gates = predictor.head_outputs_from_features(data.features)
        out[f"{prefix}_logits"] = torch.as_tensor(logits)
        if gates is not None:
            out[f"{prefix}_gate"] = torch.as_tensor(gates)
    return out


def load_predictions(layout: Layout, partition: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(probs [N,2], labels [N])`` of the best checkpoint on ``split`` (labels from the index)."""
    probs, _, labels = load_prediction_outputs(layout, partition, split)
    return probs, labels


def load_prediction_outputs(layout: Layout, partition: str, split: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(probs [N,2], raw gate logits [N] or None, labels [N])`` on ``split``."""
    outputs = load_split_outputs(layout, partition, split)
    return outputs.probs, outputs.gate_logits, outputs.labels


def load_split_outputs(layout: Layout, partition: str, split: str) -> "SplitOutputs":
    """The checkpoint's outputs on ``split`` as :class:`~stage1_core.policies.base.SplitOutputs`.

    The rows' sample ids (recorded by the predictions step from the features it predicted on) tag
    them with the split that holds them and join their labels; rows stored under ``split`` that
    hold another split's images are refused here, and the tag is what fits check their role on.
    """
    from stage1_core.artifacts import read_json
    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.data.splits import SplitError, require_stored_as
    from stage1_core.policies.base import SplitOutputs

    directory = layout.path("predictions", partition)
    rows = {row["split"]: row for row in read_json(directory / "predictions.json", schema="predictions")["splits"]}
    if split not in rows:
        raise SplitError(f"{directory / 'predictions.json'}: no predictions on {split!r} (it has {sorted(rows)})")
    ids = rows[split]["sample_ids"]
    tensors = load_tensors(directory / PREDICTIONS_FILE)
    logits = tensors[f"{split}_logits"].numpy()
    if len(ids) != logits.shape[0]:
        raise SplitError(f"{directory}: {len(ids)} sample ids for {logits.shape[0]} rows of {split!r} logits; "
                         f"re-materialise predictions[{partition}]")
    splits, index = read_splits(layout)
    holder = require_stored_as(ids, split, splits, f"{directory / 'predictions.json'}",
                               f"re-materialise predictions[{partition}] on the current splits", rows="predictions")
    gate = tensors.get(f"{split}_gate")
    return SplitOutputs(Stage1Predictor.probabilities(logits),
                        gate.numpy().astype(np.float64) if gate is not None else None,
                        np.asarray(index.labels(ids)), holder)
