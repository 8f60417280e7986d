"""Head training: loss, optimiser, schedule, EMA, seeding, checkpoints, CSV log and the trainer."""

from stage1_core.features import TensorSplit
from stage1_core.training.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    save_state_dict,
)
from stage1_core.training.ema import EMA, check_ema_horizon
from stage1_core.training.losses import build_criterion, class_weights
from stage1_core.training.optimizers import build_adamw, param_groups
from stage1_core.training.schedulers import build_scheduler, optimizer_steps_per_epoch, warmup_cosine_lambda
from stage1_core.training.seeding import capture_rng_states, restore_rng_states, seed_everything
from stage1_core.training.trainer import (
    TrainingError,
    TrainResult,
    load_head,
    predict_logits,
    predict_outputs,
    resolve_amp,
    train_head,
)

__all__ = [
    "TensorSplit",
    "CheckpointError",
    "load_checkpoint",
    "load_state_dict_file",
    "save_checkpoint",
    "save_state_dict",
    "EMA",
    "check_ema_horizon",
    "build_criterion",
    "class_weights",
    "build_adamw",
    "param_groups",
    "build_scheduler",
    "optimizer_steps_per_epoch",
    "warmup_cosine_lambda",
    "capture_rng_states",
    "restore_rng_states",
    "seed_everything",
    "TrainingError",
    "TrainResult",
    "load_head",
    "predict_logits",
    "predict_outputs",
    "resolve_amp",
    "train_head",
]
