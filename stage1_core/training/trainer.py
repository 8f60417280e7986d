"""Training the Stage-1 head: the baseline script's loop, minus its bugs, for both training modes.

``train_head`` trains on either

* a :class:`~stage1_core.features.TensorSplit` (``train_cached``): features stay one tensor on
  the device, each epoch shuffles row indices with a seeded generator and slices batches (no
  per-sample Dataset, no collate); or
* a ``DataLoader`` of augmented images (``train``): the frozen backbone runs on every batch
  (``no_grad``, eval mode), the head trains on its CLS features.

Both modes share one step: class-weighted CE with label smoothing, ``loss / accum`` backward,
an optimiser step every ``grad_accum_steps`` batches with gradients unscaled (AMP) then clipped
to ``max_grad_norm``, then the LambdaLR step and the EMA update - the baseline's order. Fixes
relative to the baseline: the schedule counts optimiser steps; a last partial accumulation
group in an epoch steps with its gradient averaged over the batches it holds (the baseline
carried it into the next epoch); AMP is off on CPU and uses bf16 where the GPU supports it
(fp16 + GradScaler otherwise); EMA has a warm-up (see :mod:`stage1_core.training.ema`);
checkpoints go to ``output_dir`` with everything an exact resume needs.

Every epoch validates on ``val_select`` only, with EMA weights applied, and early-stops on the
selection metric (``accuracy``: higher is better; ``augrc``: lower is better;
``certified_coverage``: the coverage the exit score certifies on val_select at target_fnr_exit,
higher is better, ties to the more accurate epoch). With ``selection_accuracy_tolerance`` a
non-accuracy metric is maximised among the epochs within that tolerance of the run's best val_select
accuracy (:mod:`stage1_core.training.selection`; candidates' weights in ``selection_candidates/``,
patience counts epochs since the kept one). Outputs in ``output_dir``:
``model_best.pth`` (plain head state_dict = EMA weights of the best epoch),
``model_best_accuracy.pth`` (accuracy-best, when selecting by another metric),
``checkpoint_last.pth`` (full checkpoint, every epoch) and the CSV log (``config.log_file``,
relative to ``output_dir``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from stage1_core.artifacts import atomic_write_bytes
from stage1_core.distributed import ddp, env
from stage1_core.features import TensorSplit
from stage1_core.model.head import (
    HeadOutput,
    Stage1Head,
    head_logits,
    load_head_state_dict,
    maybe_compile,
    normalise_head_keys,
)
from stage1_core.training.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    save_state_dict,
)
from stage1_core.training.ema import EMA, check_ema_horizon
from stage1_core.training.logging_csv import SELECTIVE_PREFIX, write_log
from stage1_core.training.losses import build_criterion
from stage1_core.training.optimizers import SAM, build_training_optimizer, sam_accumulated_step
from stage1_core.training.schedulers import build_scheduler, optimizer_steps_per_epoch
from stage1_core.training.seeding import capture_rng_states, enable_tf32, restore_rng_states, seed_everything
from stage1_core.training.selection import EpochScore, choose_epoch, live_candidates

logger = logging.getLogger(__name__)

BEST_FILE = "model_best.pth"
BEST_ACCURACY_FILE = "model_best_accuracy.pth"
#: Trainable backbone parameters (adapters) of the best epoch, when the backbone is fine-tuned.
BEST_ADAPTERS_FILE = "adapters_best.pth"
LAST_CHECKPOINT_FILE = "checkpoint_last.pth"
#: Full checkpoint of every epoch (``save_every_epoch``), the baseline's checkpoint format.
EPOCH_CHECKPOINT_FILE = "checkpoint_epoch{epoch}.pth"
#: Weights of the epochs that may still be selected under ``selection_accuracy_tolerance``.
CANDIDATES_DIR = "selection_candidates"
#: Selection metric -> direction. ``certified_coverage`` is the coverage the exit rule certifies
#: on val_select at the product's operating point (FNR on exits <= target_fnr_exit with
#: probability 1 - delta): the figure val_calib will certify, where AUGRC averages over every coverage.
SELECTION_METRICS = {"accuracy": "max", "augrc": "min", "certified_coverage": "max"}
#: Metrics whose ties go to the more accurate epoch: a coverage is a count over val_select, and
#: epochs that certify the same share (often none, early in training) differ in accuracy.
TIES_BROKEN_BY_ACCURACY = frozenset({"certified_coverage"})
#: History key of each selection metric's value.
SELECTION_KEYS = {"accuracy": "val_acc", "augrc": f"{SELECTIVE_PREFIX}augrc", "certified_coverage": "certified_coverage"}
EVAL_CHUNK = 8192
POSTFIX_EVERY = 10

LossFn = Callable[[torch.Tensor | HeadOutput, torch.Tensor], torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to change."""


@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision: autocast dtype (None = off) and whether a GradScaler is needed."""

    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_amp(use_amp: bool, device: torch.device) -> AmpSettings:
    """CUDA: bf16 autocast where supported (no scaler), else fp16 + GradScaler. CPU: off."""
    if not use_amp or device.type != "cuda":
        return AmpSettings(None, False)
    if torch.cuda.is_bf16_supported():
        return AmpSettings(torch.bfloat16, False)
    return AmpSettings(torch.float16, True)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    """What :func:`train_head` produced (paths in ``output_dir``; metrics as fractions)."""

    best_checkpoint: Path | None
    last_checkpoint: Path
    log_csv: Path
    best_epoch: int
    best_metric: float | None
    selection_metric: str
    history: list[dict[str, Any]]
    losses_finite: bool
    epochs_run: int
    stopped_early: bool
    accuracy_best_checkpoint: Path | None
    best_val_accuracy: float
    global_step: int
    hidden_size: int
    #: Gradient norm (before clipping) and mean training loss of every optimiser step.
    grad_norms: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    #: Peak resident memory of the process (and CUDA max allocated on a GPU), in GiB.
    peak_rss_gb: float | None = None
    peak_cuda_gb: float | None = None
    #: Adapter weights of the best epoch (fine-tuning only).
    best_adapters: Path | None = None
    #: Memory of the device trained on (GPU total, else physical RAM), GiB, and the warning given
    #: when the peak came within ``MEMORY_WARNING_FRACTION`` of it (None when it did not).
    device_memory_gb: float | None = None
    memory_warning: str | None = None
    #: ``checkpoint_epochN.pth`` files written (``save_every_epoch``).
    epoch_checkpoints: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("best_checkpoint", "last_checkpoint", "log_csv", "accuracy_best_checkpoint", "best_adapters"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["epoch_checkpoints"] = [str(p) for p in self.epoch_checkpoints]
        return data


class _CachedBatches:
    """Shuffled, ``drop_last`` batches of rows of tensors that live on the device."""

    def __init__(self, split: TensorSplit, batch_size: int, device: torch.device, generator: torch.Generator) -> None:
        self.features = split.features.to(device, torch.float32)
        self.labels = split.labels.to(device)
        # Several views per image (data.views.MultiViewSplit): one drawn per image and epoch.
        views = getattr(split, "views", None)
        self.views = views.to(device, torch.float32) if views is not None else None
        self.batch_size = batch_size
        self.generator = generator
        self.device = device
        self.num_batches = len(split) // batch_size
        ddp.check_global_batch(batch_size)  # under DDP each rank takes its slice of every global batch
        if self.num_batches == 0:
            raise TrainingError(
                f"the training split has {len(split)} samples, fewer than one batch of {batch_size} "
                f"(batches drop the incomplete last one, as in the baseline); lower max_batch_size"
            )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.labels.shape[0], generator=self.generator).to(self.device)
        features = self.features
        if self.views is not None:
            pick = torch.randint(self.views.shape[0], (self.labels.shape[0],), generator=self.generator).to(self.device)
            features = self.views[pick, torch.arange(self.labels.shape[0], device=self.device)]
        for i in range(self.num_batches):
            index = order[i * self.batch_size : (i + 1) * self.batch_size][env.rank_slice(self.batch_size)]
            yield features[index], self.labels[index]


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_json_dict"):
        return config.to_json_dict()
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def _train_labels(train: TensorSplit | DataLoader) -> torch.Tensor:
    if isinstance(train, TensorSplit):
        return train.labels
    labels = getattr(train.dataset, "labels", None)
    if labels is None:
        raise TrainingError(
            "the training DataLoader's dataset has no .labels (needed for the class weights); "
            "use stage1_core.data.datasets.LabelledImageDataset or add a labels attribute"
        )
    return torch.as_tensor(list(labels), dtype=torch.int64)


def _epoch_scores(history: list[dict[str, Any]], metric: str) -> list[EpochScore]:
    return [EpochScore(int(r["epoch"]), float(r[SELECTION_KEYS[metric]]), float(r["val_acc"])) for r in history]


def _candidate_files(directory: Path, epoch: int) -> tuple[Path, Path]:
    return directory / f"head_epoch{epoch}.pth", directory / f"adapters_epoch{epoch}.pth"


def _save_candidate(directory: Path, epoch: int, head: nn.Module, backbone_model: nn.Module | None) -> None:
    """The epoch's (EMA) head, and its adapters when the backbone trains, as a selection candidate."""
    directory.mkdir(parents=True, exist_ok=True)
    head_file, adapters_file = _candidate_files(directory, epoch)
    save_state_dict(head_file, head.state_dict())
    if backbone_model is not None:
        save_state_dict(adapters_file, _trainable_state(backbone_model))


def _promote_candidate(directory: Path, epoch: int, best_path: Path, best_adapters_path: Path | None) -> None:
    """Make the candidate of ``epoch`` the best checkpoint (atomic copies)."""
    head_file, adapters_file = _candidate_files(directory, epoch)
    atomic_write_bytes(best_path, head_file.read_bytes())
    if best_adapters_path is not None:
        atomic_write_bytes(best_adapters_path, adapters_file.read_bytes())


def _prune_candidates(directory: Path, live: set[int]) -> None:
    """Delete the candidates no later epoch can make the choice."""
    for path in directory.glob("*_epoch*.pth"):
        if int(path.stem.rsplit("epoch", 1)[1]) not in live:
            path.unlink(missing_ok=True)


@dataclass
class _State:
    start_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    best_accuracy: float = 0.0
    patience: int = 0
    stopped_early: bool = False
    losses_finite: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)


def _validation_metrics(
    logits: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, exit_threshold: float,
    gate: torch.Tensor | None = None, operating_point: tuple[float, float] | None = None,
) -> dict[str, Any]:
    from stage1_core.metrics.calibration import compute_ece
    from stage1_core.metrics.selective import selective_metrics

    logits = logits.float()
    val_loss = float(criterion(logits, labels.to(logits.device)))
    probs = torch.softmax(logits, dim=1).double().cpu().numpy()
    y = labels.cpu().numpy()
    pred = probs.argmax(axis=1)
    p1 = probs[:, 1]
    exit_mask = (p1 >= exit_threshold) | (p1 <= 1.0 - exit_threshold)
    exit_acc = float(((p1[exit_mask] > 0.5).astype(np.int64) == y[exit_mask]).mean()) if exit_mask.any() else None
    out: dict[str, Any] = {
        "val_loss": val_loss,
        "val_acc": float((pred == y).mean()),
        "ece": float(compute_ece(probs, y, n_bins=10)),
        "exit_coverage": float(exit_mask.mean()),
        "exit_acc": exit_acc,
    }
    if gate is not None:  # gated head: the raw gate's acceptance (monitoring; certified later on val_calib)
        accepted = (torch.sigmoid(gate.float()) >= 0.5).cpu().numpy()
        out["gate_coverage"] = float(accepted.mean())
        out["gate_acc"] = float((pred[accepted] == y[accepted]).mean()) if accepted.any() else None
    selective = selective_metrics(probs.max(axis=1), (pred != y).astype(np.float64))
    out.update({f"{SELECTIVE_PREFIX}{k}": float(v) for k, v in selective.items()})
    if operating_point is not None:
        out["certified_coverage"] = certified_coverage(probs, y, gate, *operating_point)
    return out


def certified_coverage(
    probs: np.ndarray, labels: np.ndarray, gate: torch.Tensor | None, target_fnr: float, delta: float
) -> float:
    """Coverage of "exit iff score >= t" with FNR on exits certified <= ``target_fnr`` on these rows.

    The exit score is the one the phase's policy thresholds: the gate logit for a gated head (a
    monotone calibration keeps its order), max softmax otherwise; the prediction is argmax(p).
    0.0 when no threshold certifies. Used on val_select to select checkpoints only.
    """
    from stage1_core.calibration.threshold_sweep import certify_score_threshold

    scores = probs.max(axis=1) if gate is None else gate.double().cpu().numpy()
    return float(certify_score_threshold(scores, probs.argmax(axis=1), labels, target_fnr, delta).coverage)


@torch.no_grad()
def _head_logits(
    model: nn.Module, features: torch.Tensor, amp: AmpSettings, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class logits and, for a gated head, the gate logits (else None)."""
    chunks, gates = [], []
    with amp.autocast(device):
        for start in range(0, features.shape[0], EVAL_CHUNK):
            output = model(features[start : start + EVAL_CHUNK])
            chunks.append(head_logits(output).float())
            if isinstance(output, HeadOutput):
                gates.append(output.gate.float())
    return torch.cat(chunks), (torch.cat(gates) if gates else None)


@torch.no_grad()
def _loader_features(backbone: Any, loader: DataLoader, device: torch.device, amp: AmpSettings) -> TensorSplit:
    feats, labels = [], []
    with amp.autocast(device):
        for images, targets in loader:
            feats.append(backbone.extract(images.to(device, non_blocking=True)).float())
            labels.append(torch.as_tensor(targets, dtype=torch.int64))
    return TensorSplit(torch.cat(feats), torch.cat(labels).to(device), None, "val_select")


def train_head(
    config: Any,
    train: TensorSplit | DataLoader,
    val_select: TensorSplit | DataLoader,
    output_dir: str | Path,
    *,
    selection_metric: str | None = None,
    resume_checkpoint: str | Path | None = None,
    progress: bool = True,
    backbone: Any = None,
    device: str | torch.device | None = None,
    stop_after_epoch: int | None = None,
    loss_fn: LossFn | None = None,
    with_gate: bool = False,
    init_head_state: Any = None,
    select_from_start: bool = False,
) -> TrainResult:
    """Train a :class:`~stage1_core.model.head.Stage1Head`; see the module docstring.

    ``config`` is a :class:`~stage1_core.config.Stage1ProConfig` (fields used: epochs,
    warmup_epochs, max_batch_size, grad_accum_steps, lr_head, lr_backbone, weight_decay,
    dropout, label_smoothing, max_grad_norm, use_amp, use_ema, ema_decay, ema_warmup,
    early_stop_patience, legacy_exit_threshold_for_logging, compile_head, seed, log_file,
    selection_metric, gate_margin_input). ``train`` as a DataLoader needs ``backbone``; its
    batch size is the loader's. ``selection_metric`` defaults to ``config.selection_metric``.
    ``resume_checkpoint`` continues a run from a full checkpoint exactly (model, optimiser,
    scheduler, EMA, scaler, epoch, best, patience, RNG states, history).
    ``stop_after_epoch`` ends the call after that (1-based) epoch as if interrupted - the
    schedule still spans ``config.epochs`` - so a later call can resume. ``loss_fn(output,
    labels)`` replaces the class-weighted CE (later phases); ``with_gate`` builds the gated head
    (its gate reads the detached class margin when ``config.gate_margin_input`` is on).
    ``init_head_state`` (a head state_dict) warm-starts the head. A backbone with trainable
    parameters (adapters) trains with the head: its parameters get ``lr_backbone`` (layer-wise
    decayed), the EMA covers them too, and each best epoch also writes ``adapters_best.pth``.
    ``config.optimizer`` picks AdamW, SAM or F-SAM (two passes per step, see
    :func:`~stage1_core.training.optimizers.sam_accumulated_step`). ``select_from_start`` makes the
    starting weights (``init_head_state`` and the backbone as given) a selection candidate: they are
    evaluated on val_select before the first step and logged as epoch 0, and stay the best
    checkpoint unless an epoch beats them (fine-tuning from a linear probe may only make it worse).
    """
    metric = selection_metric or getattr(config, "selection_metric", "accuracy")
    if metric not in SELECTION_METRICS:
        raise TrainingError(f"selection_metric={metric!r} is not supported: use one of {sorted(SELECTION_METRICS)}")
    mode = SELECTION_METRICS[metric]
    tolerance = getattr(config, "selection_accuracy_tolerance", None) if metric != "accuracy" else None
    operating_point = (float(config.target_fnr_exit), float(config.delta)) if hasattr(config, "target_fnr_exit") else None
    if metric == "certified_coverage" and operating_point is None:
        raise TrainingError("selection_metric='certified_coverage' needs target_fnr_exit and delta in the config")
    device = resolve_device(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = Path(config.log_file) if Path(config.log_file).is_absolute() else out / config.log_file
    seed_everything(int(config.seed))
    reset_peak_memory(device)
    if device.type == "cuda":
        enable_tf32()
    amp = resolve_amp(bool(config.use_amp), device)

    cached = isinstance(train, TensorSplit)
    if not cached and backbone is None:
        raise TrainingError("mode 'train' (a DataLoader of images) needs the backbone: pass backbone=DINOv3Backbone")
    hidden = train.hidden_size if cached else int(backbone.hidden_size)
    if isinstance(val_select, TensorSplit) and val_select.hidden_size != hidden:
        raise TrainingError(f"val_select features have size {val_select.hidden_size}, train features {hidden}")

    head = Stage1Head(hidden, float(config.dropout), with_gate=with_gate,
                      gate_margin_input=with_gate and bool(getattr(config, "gate_margin_input", False))).to(device)
    if init_head_state is not None:
        load_head_state_dict(head, init_head_state, source="init_head_state")
    elif cached and getattr(config, "standardize_features", False):
        head.set_input_standardization(train.features)
    model = maybe_compile(head, getattr(config, "compile_head", None))
    criterion = build_criterion(
        _train_labels(train),
        float(config.label_smoothing),
        device,
        weighted=getattr(config, "class_weighting", "balanced") == "balanced",
    )
    trainable_backbone = list(backbone.trainable_parameters()) if (backbone is not None and not cached) else []
    ddp.broadcast_trainable(head, backbone.model if trainable_backbone else None)
    ddp.seed_rank(int(config.seed))  # before a resume restores each rank's own states
    optimizer = build_training_optimizer(config, head, backbone.model if trainable_backbone else None)
    clip_params = [p for p in head.parameters() if p.requires_grad] + trainable_backbone

    generators: dict[str, torch.Generator] = {}
    if cached:
        shuffle = torch.Generator()
        shuffle.manual_seed(int(config.seed))
        generators["shuffle"] = shuffle
        # A loss may ask for its own batch (conformal risk training calibrates inside each batch).
        batch_size = int(getattr(loss_fn, "batch_size", None) or config.max_batch_size)
        batches: Any = _CachedBatches(train, batch_size, device, shuffle)
    else:
        batches = train
        if getattr(train, "generator", None) is not None:
            generators["loader"] = train.generator
    num_batches = len(batches)
    if num_batches == 0:
        raise TrainingError("the training loader yields no batch (fewer samples than one batch with drop_last)")
    accum = int(config.grad_accum_steps)
    steps_per_epoch = optimizer_steps_per_epoch(num_batches, accum)
    total_steps = int(config.epochs) * steps_per_epoch
    warmup_steps = int(config.warmup_epochs) * steps_per_epoch
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler("cuda") if amp.use_scaler else None
    # With a fine-tuned backbone the EMA averages adapters and head together, so the evaluated
    # (and saved) model is one consistent set of weights.
    ema_target = nn.ModuleDict({"head": head, "backbone": backbone.model}) if trainable_backbone else head
    ema = EMA(ema_target, float(config.ema_decay), bool(getattr(config, "ema_warmup", True))) if config.use_ema else None
    if ema is not None:
        check_ema_horizon(ema.decay, total_steps, ema.warmup)

    state = _State()
    candidates_dir = out / CANDIDATES_DIR
    if resume_checkpoint is None and env.is_main():
        # A best checkpoint left by an earlier run in the same directory is never this run's best.
        for stale in (out / BEST_FILE, out / BEST_ACCURACY_FILE, out / BEST_ADAPTERS_FILE,
                      *out.glob(EPOCH_CHECKPOINT_FILE.format(epoch="*")), *candidates_dir.glob("*.pth")):
            stale.unlink(missing_ok=True)
    if resume_checkpoint is not None:
        state = _resume(
            Path(resume_checkpoint), config, head, optimizer, scheduler, scaler, ema, generators,
            backbone.model if trainable_backbone else None,
        )
        logger.info("resumed from %s at epoch %d (global step %d)", resume_checkpoint, state.start_epoch + 1, state.global_step)

    val_cache: TensorSplit | None = None
    if isinstance(val_select, TensorSplit):
        val_cache = TensorSplit(val_select.features.to(device, torch.float32), val_select.labels.to(device), None, "val_select")

    def features_of(inputs: torch.Tensor) -> torch.Tensor:
        if cached:
            return inputs
        backbone.model.eval()  # deterministic features: no RoPE jitter, no dropout
        if trainable_backbone:
            from stage1_core.model.backbone import eval_keeping_checkpointing

            eval_keeping_checkpointing(backbone.model)  # gradient_checkpointing: blocks still recompute
            return backbone(inputs)
        with torch.no_grad():
            return backbone(inputs)

    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(device)

    def loss_of(output: torch.Tensor | HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(output, labels) if loss_fn is not None else criterion(head_logits(output), labels)

    train_model, train_features_of = model, features_of
    if env.active():
        # One DDP module over the head and the trainable backbone; rank 0's weights go to every rank.
        joint = ddp.JointModel(model, backbone.model if trainable_backbone else None, features_of)
        train_model = ddp.wrap(joint, device, find_unused=with_gate)
        train_features_of = _identity
    main = env.is_main()  # rank 0 writes every file; all ranks take the same decisions
    best_path = out / BEST_FILE
    best_acc_path = out / BEST_ACCURACY_FILE
    best_adapters_path = out / BEST_ADAPTERS_FILE
    last_path = out / LAST_CHECKPOINT_FILE
    epoch_checkpoints: list[Path] = []

    def evaluate_and_select(epoch: int) -> tuple[dict[str, Any], float, bool]:
        """val_select metrics of the current (EMA) weights; saves them when they are the new best."""
        nonlocal val_cache
        model.eval()
        context = ema.applied() if ema is not None else contextlib.nullcontext()
        with context:
            if not isinstance(val_select, TensorSplit) and (val_cache is None or trainable_backbone):
                val_cache = _loader_features(backbone, val_select, device, amp)  # type: ignore[arg-type]
            logits, gate = _head_logits(model, val_cache.features, amp, device)
            val = _validation_metrics(logits, val_cache.labels, criterion, float(config.legacy_exit_threshold_for_logging),
                                      gate, operating_point)
            value = val[SELECTION_KEYS[metric]]
            accuracy_improved = val["val_acc"] > state.best_accuracy
            # One rule for every run (training.selection): the best value so far, or with an accuracy
            # band the best among the accurate epochs, whose weights stay candidates until unreachable.
            scores = [*_epoch_scores(state.history, metric), EpochScore(epoch, float(value), float(val["val_acc"]))]
            ties = metric in TIES_BROKEN_BY_ACCURACY
            kept = choose_epoch(scores, mode == "max", tolerance, ties)
            chosen = next((s for s in scores if s.epoch == kept), None)
            improved = kept == epoch
            if main:
                if improved:
                    save_state_dict(best_path, head.state_dict())
                    if trainable_backbone:
                        save_state_dict(best_adapters_path, _trainable_state(backbone.model))
                if tolerance is not None:
                    _save_candidate(candidates_dir, epoch, head, backbone.model if trainable_backbone else None)
                    if chosen is not None and not improved and chosen.epoch != state.best_epoch:
                        # a more accurate epoch moved the band past the kept one: an earlier one takes over
                        _promote_candidate(candidates_dir, chosen.epoch, best_path,
                                           best_adapters_path if trainable_backbone else None)
                    _prune_candidates(candidates_dir, live_candidates(scores, mode == "max", tolerance, ties))
            if metric != "accuracy" and accuracy_improved and main:
                save_state_dict(best_acc_path, head.state_dict())
        if chosen is not None:  # patience: epochs since the kept one
            state.best_metric, state.best_epoch, state.patience = chosen.value, chosen.epoch, epoch - chosen.epoch
        else:
            state.patience += 1
        if accuracy_improved:
            state.best_accuracy = val["val_acc"]
        return val, float(value), bool(improved)

    def log_epoch(epoch: int, train_stats: dict[str, Any], val: dict[str, Any], value: float, improved: bool,
                  lr: float | None, started: float) -> dict[str, Any]:
        """Append the epoch's history record and rewrite the CSV log (rank 0)."""
        record = {"epoch": epoch, **train_stats, **val, "best_val_acc": state.best_accuracy, "lr": lr,
                  "selection_metric": metric, "selection_value": value, "improved": improved,
                  "global_step": state.global_step, "epoch_seconds": time.perf_counter() - started}
        state.history.append(record)
        if main:
            write_log(log_path, state.history)
        return record

    if select_from_start and resume_checkpoint is None:
        started = time.perf_counter()
        val, value, improved = evaluate_and_select(0)
        log_epoch(0, {"train_loss": None, "train_acc": None}, val, value, improved, None, started)
        logger.info("start (epoch 0, before any step): val_select acc %.2f%% AUGRC %.4f - a selection candidate",
                    100 * val["val_acc"], val[f"{SELECTIVE_PREFIX}augrc"])
    for epoch in range(state.start_epoch, int(config.epochs)):
        if state.stopped_early or not state.losses_finite:
            break
        started = time.perf_counter()
        train_stats = _train_epoch(
            train_model, batches, train_features_of, loss_of, optimizer, scheduler, scaler, ema, clip_params,
            accum, float(config.max_grad_norm), amp, device, progress, f"Epoch {epoch + 1}/{config.epochs} [Train]", state,
        )
        if not math.isfinite(train_stats["train_loss"]):
            state.losses_finite = False
            logger.error("epoch %d: non-finite training loss; stopping (no checkpoint is taken from this epoch)", epoch + 1)
            break

        val, value, improved = evaluate_and_select(epoch + 1)
        record = log_epoch(epoch + 1, train_stats, val, value, improved, optimizer.param_groups[0]["lr"], started)
        exit_acc = "n/a (nothing exits)" if val["exit_acc"] is None else f"{100 * val['exit_acc']:.2f}%"
        logger.info(
            "epoch %d/%d: train loss %.4f acc %.2f%% | val_select loss %.4f acc %.2f%% ECE %.4f AUGRC %.4f | "
            "legacy exit@%.2f (monitoring only): %.1f%% at %s | lr %.2e%s",
            epoch + 1, config.epochs, train_stats["train_loss"], 100 * train_stats["train_acc"], val["val_loss"],
            100 * val["val_acc"], val["ece"], val[f"{SELECTIVE_PREFIX}augrc"], config.legacy_exit_threshold_for_logging,
            100 * val["exit_coverage"], exit_acc, record["lr"], " | best so far" if improved else "",
        )
        if state.patience >= int(config.early_stop_patience):
            state.stopped_early = True
            logger.info("early stopping: %d epochs without improvement of %s", state.patience, metric)
        rng_states = ddp.gather_rng_states(generators)  # every rank's, for an exact resume on every rank
        if main:
            _save_full_checkpoint(last_path, epoch, config, head, optimizer, scheduler, scaler, ema, generators, state,
                                  metric, backbone.model if trainable_backbone else None, rng_states)
            if getattr(config, "save_every_epoch", False):
                epoch_path = out / EPOCH_CHECKPOINT_FILE.format(epoch=epoch + 1)
                atomic_write_bytes(epoch_path, last_path.read_bytes())
                epoch_checkpoints.append(epoch_path)
        if state.stopped_early:
            break
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    env.barrier()  # rank 0's files exist for every rank past this point

    peak_cuda = (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None
    peak_rss = peak_rss_gb()
    limit = device_memory_gb(device)
    warning = memory_warning(peak_cuda if peak_cuda is not None else peak_rss, limit, device.type)
    if warning:
        logger.warning(warning)
    return TrainResult(
        best_checkpoint=best_path if (best_path.is_file() and state.best_metric is not None) else None,
        last_checkpoint=last_path,
        log_csv=log_path,
        best_epoch=state.best_epoch,
        best_metric=state.best_metric,
        selection_metric=metric,
        history=state.history,
        losses_finite=state.losses_finite,
        epochs_run=sum(1 for record in state.history if record["epoch"] > 0),
        stopped_early=state.stopped_early,
        accuracy_best_checkpoint=(best_acc_path if metric != "accuracy" and best_acc_path.is_file() else None),
        best_val_accuracy=state.best_accuracy,
        global_step=state.global_step,
        hidden_size=hidden,
        grad_norms=list(state.grad_norms),
        step_losses=list(state.step_losses),
        peak_rss_gb=peak_rss,
        peak_cuda_gb=peak_cuda,
        best_adapters=best_adapters_path if (trainable_backbone and best_adapters_path.is_file() and state.best_metric is not None) else None,
        device_memory_gb=limit,
        memory_warning=warning,
        epoch_checkpoints=epoch_checkpoints,
    )


#: Peak memory above this fraction of the device's memory is reported as a warning.
MEMORY_WARNING_FRACTION = 0.9


def device_memory_gb(device: torch.device) -> float | None:
    """Total memory of ``device`` in GiB: the GPU's, else the machine's physical RAM (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import os

        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (AttributeError, ValueError, OSError):
        return None


def memory_warning(peak_gb: float | None, limit_gb: float | None, device_type: str,
                   fraction: float = MEMORY_WARNING_FRACTION) -> str | None:
    """A warning when ``peak_gb`` reached ``fraction`` of ``limit_gb`` (else None), with what to do."""
    if peak_gb is None or not limit_gb or peak_gb < fraction * limit_gb:
        return None
    what = "GPU memory (max allocated)" if device_type == "cuda" else "physical memory (peak RSS)"
    return (f"training peaked at {peak_gb:.2f} GiB of {what}, {100 * peak_gb / limit_gb:.0f}% of the device's "
            f"{limit_gb:.2f} GiB: a larger batch or model may run out of memory - lower max_batch_size, set "
            f"gradient_checkpointing: true (fine-tuning) or use_amp: true")


def reset_peak_memory(device: torch.device) -> None:
    """Start this process's peak-memory figures afresh, so they describe one training run.

    Steps of a Dagster run may share one process (the in-process executor): without a reset the
    peak of an earlier step (e.g. ExPLoRA pre-training) would be reported as training's. On Linux,
    writing 5 to ``/proc/self/clear_refs`` resets the peak resident set size (``VmHWM``); CUDA
    has its own counters.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: peak_rss_gb falls back to the process-lifetime peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_gb() -> float:
    """Peak resident set size in GiB since :func:`reset_peak_memory` (Linux ``VmHWM``), else of the process."""
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def _identity(inputs: torch.Tensor) -> torch.Tensor:
    return inputs


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``module`` by name (a fine-tuned backbone's adapters)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def _train_epoch(
    model: nn.Module,
    batches: Any,
    features_of: Callable[[torch.Tensor], torch.Tensor],
    loss_of: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    ema: EMA | None,
    clip_params: list[torch.Tensor],
    accum: int,
    max_grad_norm: float,
    amp: AmpSettings,
    device: torch.device,
    progress: bool,
    desc: str,
    state: _State,
) -> dict[str, float]:
    """One pass over ``batches`` with gradient accumulation; returns mean loss and accuracy.

    AdamW: ``loss / accum`` backward per batch, one step per group. SAM / F-SAM: the batches of a
    group are kept and :func:`sam_accumulated_step` runs the clean and the perturbed pass over
    them. Either way every optimiser step appends its gradient norm (before clipping) and its
    mean loss to ``state``.
    """
    from stage1_core.progress import progress as tqdm

    model.train()
    num_batches = len(batches)
    full_groups_end = (num_batches // accum) * accum
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    sharpness_aware = isinstance(optimizer, SAM)
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    group_loss = torch.zeros((), device=device, dtype=torch.float64)
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(total=num_batches, desc=desc, unit="batch", disable=not progress, leave=False)

    def forward(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[Any, torch.Tensor]:
        with amp.autocast(device):
            output = model(features_of(inputs))
            return output, loss_of(output, labels)

    for index, (inputs, labels) in enumerate(batches):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        divisor = accum if index < full_groups_end else num_batches - full_groups_end
        closes_group = (index + 1) % accum == 0 or index + 1 == num_batches
        if sharpness_aware:
            group.append((inputs, labels))
            if not closes_group:
                bar.update(1 if progress else 0)
                continue
            clean: list[tuple[Any, torch.Tensor]] = []

            def compute_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                output, loss = forward(*batch)
                if len(clean) < len(group):
                    clean.append((output, loss.detach()))
                return loss

            _, grad_norm = sam_accumulated_step(optimizer, compute_loss, group, scaler=scaler,
                                                max_grad_norm=max_grad_norm, params=clip_params)
            for (output, loss), (_, batch_labels) in zip(clean, group):
                loss_sum += loss
                group_loss += loss
                correct += (head_logits(output).detach().argmax(dim=1) == batch_labels).sum()
                seen += int(batch_labels.shape[0])
            steps_in_group = len(group)
            group = []
        else:
            # Under DDP the gradients are all-reduced once per group, on the batch that closes it.
            sync = model.no_sync() if (not closes_group and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                output, loss = forward(inputs, labels)
                scaled = loss / divisor
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()
            group_loss += loss.detach()
            correct += (head_logits(output).detach().argmax(dim=1) == labels).sum()
            seen += int(labels.shape[0])
            if not closes_group:
                bar.update(1 if progress else 0)
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(clip_params, max_grad_norm))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_in_group = divisor
        scheduler.step()
        if ema is not None:
            ema.update()
        state.global_step += 1
        state.grad_norms.append(float(grad_norm))
        state.step_losses.append(float(group_loss) / steps_in_group)
        group_loss.zero_()
        if progress:
            bar.update(1)
            if (index + 1) % POSTFIX_EVERY == 0 or index + 1 == num_batches:
                bar.set_postfix(
                    loss=f"{float(loss_sum) / (index + 1):.4f}",
                    acc=f"{100.0 * int(correct) / max(seen, 1):.2f}%",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                )
    bar.close()
    total, right, count, batches_seen = env.all_reduce_sum([float(loss_sum), int(correct), seen, num_batches])
    return {"train_loss": total / batches_seen, "train_acc": right / max(count, 1)}


def _save_full_checkpoint(
    path: Path,
    epoch: int,
    config: Any,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    ema: EMA | None,
    generators: dict[str, torch.Generator],
    state: _State,
    metric: str,
    backbone: nn.Module | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write the full checkpoint; ``rng_states`` holds every rank's states when several ranks train."""
    checkpoint: dict[str, Any] = {
        "epoch": epoch,
        "model_state_dict": head.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "best_acc": 100.0 * state.best_accuracy,
        "patience_counter": state.patience,
        "config": _config_dict(config),
        "rng_states": rng_states[0] if rng_states else capture_rng_states(generators),
        "global_step": state.global_step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "selection_metric": metric,
        "history": state.history,
        "stopped_early": state.stopped_early,
        "losses_finite": state.losses_finite,
        "grad_norms": list(state.grad_norms),
        "step_losses": list(state.step_losses),
    }
    if rng_states is not None and len(rng_states) > 1:
        checkpoint[ddp.RANK_RNG_KEY] = rng_states
    if backbone is not None:
        checkpoint["backbone_trainable_state_dict"] = _trainable_state(backbone)
    if ema is not None:
        checkpoint["ema_state_dict"] = ema.shadow
        checkpoint["ema_num_updates"] = ema.num_updates
    if scaler is not None:
        checkpoint["scaler_state_dict"] = scaler.state_dict()
    save_checkpoint(path, checkpoint)


def _resume(
    path: Path,
    config: Any,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    ema: EMA | None,
    generators: dict[str, torch.Generator],
    backbone: nn.Module | None = None,
) -> _State:
    ckpt = load_checkpoint(path)
    load_head_state_dict(head, ckpt["model_state_dict"], source=path)
    if backbone is not None:
        _load_trainable_state(backbone, ckpt.get("backbone_trainable_state_dict"), path)
    try:
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        if scaler is not None and "scaler_state_dict" in ckpt:
            scaler.load_state_dict(ckpt["scaler_state_dict"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimiser/scheduler state does not fit this run ({exc})") from exc
    if ema is not None:
        if "ema_state_dict" not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks key 'ema_state_dict' but use_ema is on; resume with use_ema=False")
        try:
            ema.load_shadow(ckpt["ema_state_dict"], int(ckpt.get("ema_num_updates", 0)))
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    saved = ckpt.get("config") or {}
    current = _config_dict(config)
    changed = sorted(k for k in current if k in saved and saved[k] != current[k] and k not in ("resume_checkpoint", "created_at", "git_commit"))
    if changed:
        logger.warning("resuming %s with changed settings: %s", path, ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed))
    try:
        restore_rng_states(ddp.rng_states_for_this_rank(ckpt, path), generators)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    history = list(ckpt["history"])
    return _State(
        start_epoch=int(ckpt["epoch"]) + 1,
        global_step=int(ckpt["global_step"]),
        best_metric=None if ckpt["best_metric"] is None else float(ckpt["best_metric"]),
        best_epoch=int(ckpt.get("best_epoch", 0)),
        best_accuracy=float(ckpt["best_acc"]) / 100.0,
        patience=int(ckpt["patience_counter"]),
        stopped_early=bool(ckpt.get("stopped_early", False)),
        losses_finite=bool(ckpt.get("losses_finite", True)),
        history=history,
        grad_norms=[float(v) for v in ckpt.get("grad_norms", [])],
        step_losses=[float(v) for v in ckpt.get("step_losses", [])],
    )


def _load_trainable_state(module: nn.Module, saved: Any, source: Path | str) -> None:
    """Copy saved trainable parameters (adapters) into ``module``; refuse a set that does not match."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if not isinstance(saved, dict) or set(saved) != set(params):
        have = "none" if not isinstance(saved, dict) else f"{len(saved)} tensors"
        raise CheckpointError(
            f"{source}: the backbone's trainable parameters ({len(params)} tensors) do not match the checkpoint's "
            f"({have}); it was written for another adapter set-up"
        )
    with torch.no_grad():
        for name, value in saved.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(value)


def load_head(
    head_state_dict_path: str | Path, hidden_size: int, dropout: float = 0.0, device: str | torch.device = "cpu"
) -> Stage1Head:
    """A :class:`Stage1Head` in eval mode with the weights of ``head_state_dict_path``.

    The gated variant is chosen when the file holds ``gate.*`` keys.
    """
    state = load_state_dict_file(head_state_dict_path)
    with_gate = "gate.weight" in normalise_head_keys(state)
    head = Stage1Head(hidden_size, dropout, with_gate=with_gate)
    load_head_state_dict(head, state, source=head_state_dict_path)
    return head.to(device).eval()


@torch.inference_mode()
def predict_outputs(
    head_state_dict_path: str | Path,
    features: torch.Tensor | TensorSplit,
    config: Any = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Head outputs in float32 on CPU: ``{"logits": [N, 2]}`` plus ``gate`` [N] and ``aux`` for a gated head."""
    feats = features.features if isinstance(features, TensorSplit) else features
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, hidden], got shape {tuple(feats.shape)}")
    device = resolve_device(device)
    dropout = float(getattr(config, "dropout", 0.0)) if config is not None else 0.0
    head = load_head(head_state_dict_path, int(feats.shape[1]), dropout, device)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, feats.shape[0], EVAL_CHUNK):
        output = head(feats[start : start + EVAL_CHUNK].to(device, torch.float32))
        named = output._asdict() if isinstance(output, HeadOutput) else {"logits": output}
        for name, value in named.items():
            parts.setdefault(name, []).append(value.float().cpu())
    if not parts:
        return {"logits": torch.empty((0, 2))}
    return {name: torch.cat(values) for name, values in parts.items()}


def predict_logits(
    head_state_dict_path: str | Path,
    features: torch.Tensor | TensorSplit,
    config: Any = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Class logits ``[N, 2]`` (float32, CPU) of the head in ``head_state_dict_path`` (e.g. model_best.pth)."""
    return predict_outputs(head_state_dict_path, features, config, device)["logits"]
