"""Run configuration: every field of the baseline ``TrainingConfig`` plus the phase fields.

``Stage1ProConfig`` validates itself when built; every problem is reported at once, each naming
the field, the value and the allowed range. Saved configs keep the baseline key names (so an old
``config.json`` loads) and add ``seed``, ``created_at`` and ``git_commit``.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import subprocess
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from stage1_core.artifacts import read_json, write_json
from stage1_core.phases import PHASES, POLICIES_BY_PHASE, exit_policy_names

BUILTIN_PREFIX = "builtin:"
BUILTIN_BACKBONES = ("tiny-dinov3",)
DEFAULT_MODEL_PATH = f"{BUILTIN_PREFIX}tiny-dinov3"

__all__ = ["Stage1ProConfig", "ConfigError", "POLICIES_BY_PHASE", "config_json_schema"]

#: Optimisers each phase's row allows (``phases.PhaseRecipe.optimizers``; a test keeps them equal):
#: F-SAM / SAM are phase 5's part, every other phase trains with AdamW.
OPTIMIZERS_BY_PHASE: dict[int, tuple[str, ...]] = {1: ("adamw",), 2: ("adamw",), 3: ("adamw",), 4: ("adamw",),
                                                   5: ("fsam", "sam"), 6: ("adamw",)}

#: Directory fields of the optional training sources (``skip_missing_sources`` may leave them out).
OPTIONAL_SOURCE_FIELDS = ("roadwork_iccv_dir", "roadwork_extra_dir", "kaggle_construction_dir", "kaggle_road_issues_dir")

#: Old field names still accepted on input, mapped to their current name.
LEGACY_ALIASES = {"exit_threshold": "legacy_exit_threshold_for_logging"}
#: Fields of earlier releases that no longer steer anything, dropped when a config (e.g. an older
#: bundle's config.json) is read: ``exit_accuracy_check`` chose how the gate's exit-accuracy clause
#: was read ("confirm" / "point"); that clause is now a non-inferiority test with
#: ``exit_accuracy_margin``, stricter than either reading.
RETIRED_FIELDS = ("exit_accuracy_check",)

TARGET_COVERAGE_REFUSAL = (
    "target_coverage is not a setting of Stage-1 Pro: the only constraint is target_fnr_exit "
    "(FNR on exited samples), and coverage is maximised under it by the certified exit policy. "
    "Remove target_coverage and set target_fnr_exit instead."
)


class ConfigError(ValueError):
    """A configuration is invalid; ``problems`` lists every violation."""

    def __init__(self, problems: list[str], source: str | Path | None = None):
        self.problems = list(problems)
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid configuration:\n  " + "\n  ".join(self.problems))


def _find_key(data: Any, key: str, path: str = "$", seen: set[int] | None = None) -> list[str]:
    """JSON paths of every occurrence of ``key`` in nested dicts/lists.

    A container reached twice (YAML aliases share objects) is searched once, so a "billion
    laughs" document costs its size in the file, not its expanded size.
    """
    seen = set() if seen is None else seen
    if not isinstance(data, (dict, list)) or id(data) in seen:
        return []
    seen.add(id(data))
    hits: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            sub = f"{path}.{k}"
            if k == key:
                hits.append(sub)
            hits.extend(_find_key(v, key, sub, seen))
    else:
        for i, v in enumerate(data):
            hits.extend(_find_key(v, key, f"{path}[{i}]", seen))
    return hits


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile value may be huge or self-similar)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, limit, limit
    short.maxlong = 40
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def git_commit(cwd: str | Path | None = None) -> str | None:
    """Current git commit of ``cwd`` (the package directory by default), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Stage1ProConfig(BaseModel):
    """Everything a Stage-1 Pro run needs. Built from the CLI, a YAML/JSON file or Dagster."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # Baseline TrainingConfig fields (same names, same defaults).
    model_path: str = DEFAULT_MODEL_PATH
    train_image_dir: str | None = None
    train_labels_file: str | None = None
    val_image_dir: str | None = None
    val_labels_file: str | None = None
    mode: Literal["extract_features", "train_cached", "train"] = "train"
    cached_features_dir: str | None = None
    use_extra_roadwork: bool = False
    roadwork_iccv_dir: str | None = None
    roadwork_extra_dir: str | None = None
    use_kaggle_data: bool = False
    kaggle_construction_dir: str | None = None
    kaggle_road_issues_dir: str | None = None
    #: Go on without a switched-on optional source (extra roadwork / Kaggle) that is absent, naming
    #: it (stage1_core.data.sources); false: refuse the run and list every absent source.
    skip_missing_sources: bool = False
    max_batch_size: int = 64
    fallback_batch_size: int = 32
    grad_accum_steps: int = 2
    epochs: int = 10
    warmup_epochs: int = 1
    lr_head: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 0.01
    dropout: float = 0.3
    label_smoothing: float = 0.1
    #: "balanced" = the baseline's class weights total / (k * count); "none" = plain cross-entropy.
    class_weighting: Literal["balanced", "none"] = "balanced"
    max_grad_norm: float = 1.0
    use_amp: bool = True
    use_ema: bool = True
    ema_decay: float = 0.9999
    early_stop_patience: int = 3
    legacy_exit_threshold_for_logging: float = 0.88
    resume_checkpoint: str | None = None
    output_dir: str = "outputs"
    log_file: str = "training.log"

    # Beyond the baseline.
    #: Also keep the full checkpoint of every epoch as checkpoint_epochN.pth (the baseline kept
    #: only the last); each is as large as checkpoint_last.pth (sizes in training.json).
    save_every_epoch: bool = False
    ema_warmup: bool = True
    #: Standardise the head's input with the training features' per-dimension mean and std (fixed
    #: buffers of the head, carried by checkpoints and bundles); a warm-started head keeps its own.
    standardize_features: bool = True
    num_workers: int | None = None
    #: Processes that extract features and train (ExPLoRA, PEFT fine-tuning) together: 1 runs in
    #: the calling process; more launch ``torchrun`` (DDP, gloo on CPU / NCCL on GPUs) through
    #: Dagster Pipes. Batch sizes stay global batches, so it changes speed, not results (README
    #: "Scaling out" says how far); recorded as environment, never part of an artifact id.
    world_size: int = 1
    compile_head: bool | None = None
    skip_corrupt: bool = False
    augmentation: Literal["aggressive", "moderate", "light"] = "moderate"
    data_source: Literal["natix", "synthetic"] = "natix"
    synthetic_n_train: int = 5000
    synthetic_n_val: int = 2400
    synthetic_seed: int = 0

    # Phase fields.
    phase: int = 1
    #: Training seed (weight init, shuffling). Trying seeds never redraws the validation splits.
    seed: int = 42
    #: Seed of the val_select / val_calib / val_test assignment; fixed by default.
    split_seed: int = 0
    val_select_ratio: float = 0.33
    val_calib_ratio: float = 0.33
    val_test_ratio: float = 0.34
    target_fnr_exit: float = 0.02
    fnr_confidence: float = 0.95
    #: One of the exit policies the phase table lets this phase deploy (``phases.exit_policy_names``).
    exit_policy: str = "softmax"
    bootstrap_samples: int = 1000
    bootstrap_confidence: float = 0.95
    deploy_prior: float = 0.5
    #: The transform from a source image to what the deployed model receives
    #: (stage1_core.data.challenge): "streetvision" certifies and evaluates on one recorded draw of
    #: the subnet's challenge pipeline per val_calib / val_test image and trains on its views;
    #: "none" keeps the clean evaluation path.
    deploy_pipeline: Literal["none", "streetvision"] = "none"
    #: Challenge views cached per training image beside the clean one ("streetvision" only); each
    #: epoch samples one of the train_views + 1 per image.
    train_views: int = 1
    #: Seed of every challenge draw (val_calib, val_test, training views, per-level report).
    deploy_seed: int = 0
    #: How val_test judges the certified policy: "confirm" fails only on significant evidence that
    #: FNR_on_exited > target (one-sided exact binomial test at val_test_alpha); "bound" demands a
    #: second certificate (Clopper-Pearson upper bound <= target).
    val_test_check: Literal["confirm", "bound"] = "confirm"
    val_test_alpha: float = 0.05
    #: Margins of the comparative gate criteria, judged on val_test, paired per image, with the
    #: burden of proof on the claim (acceptance/compare.py): "not worse" passes only when the
    #: paired bootstrap CI's lower end of the gain is >= -margin. Fixed from the disagreement
    #: rates on other data seeds so that two models of equal quality pass with probability >= 0.9
    #: at the embedded default's split sizes (README "Comparative criteria and their power").
    #: Accuracy of the class head vs the previous phase (phases 2-6).
    accuracy_margin: float = 0.025
    #: Coverage of the deployed policy vs the previous phase's (or the ablation's) on the same images.
    coverage_margin: float = 0.045
    #: Exit accuracy of the gate ranking vs the softmax policy at softmax's coverage (phase 3).
    exit_accuracy_margin: float = 0.015
    #: Brier score of the calibrated gate score vs the raw sigmoid (phase 3), in Brier units.
    calibration_margin: float = 0.015
    #: val_test accuracy of the deployed head vs the accuracy baseline (every phase): the logistic
    #: probe on the frozen features, paired per image, or ``baseline_val_accuracy``. The head and the
    #: probe disagree on 3-10% of val_select images (seed 1001's and the default's), so a margin with
    #: power 0.9 at ~800 images is 2.1-3.6 points (benchmarks/power_margins.py): 4 points.
    baseline_margin: float = 0.04
    #: What picks the checkpoint on val_select: ``accuracy`` (phase 1), ``augrc`` (phases 2-6), or
    #: ``certified_coverage`` (the coverage the exit score certifies at target_fnr_exit; measured,
    #: not a phase's default: README "Checkpoint selection at the certified operating point").
    #: Each phase's recipe sets it (stage1_core.phases); ``stage1 train`` takes any.
    selection_metric: Literal["accuracy", "augrc", "certified_coverage"] = "accuracy"
    #: With a non-accuracy selection metric: select among the epochs whose val_select accuracy is
    #: within this much of the run's best (coverage under an accuracy constraint); None = no band.
    selection_accuracy_tolerance: float | None = None
    baseline_val_accuracy: float | None = None
    peft_type: Literal["none", "lora", "dora", "doran"] = "dora"
    peft_r: int = 16
    peft_blocks: int = 6
    optimizer: Literal["adamw", "sam", "fsam"] = "adamw"
    gate_loss_weight: float = 1.0
    aux_weight: float = 0.5
    #: Weight of the penalty on the soft FNR of accepted positives above target_fnr_exit (phase 3).
    gate_fnr_penalty: float = 50.0
    #: Weight of the gate-weighted selective risk r against the soft coverage (phase 3+): above 1 the
    #: gate also rejects likely errors of either class, not only misses of roadwork.
    gate_risk_weight: float = 1.0
    #: Temperature of the soft miss indicator in the gate's FNR penalty, sigmoid((z0 - z1) / T):
    #: 0 = the hard indicator 1[argmax = 0] (only the training split's actual misses count).
    gate_miss_temperature: float = 0.0
    #: Weight of the BCE of the gate logit against "the class head's prediction is correct" in the
    #: gate objective (phase 3+; scaled by gate_loss_weight too): 0 = off. See training/losses.py.
    gate_correct_weight: float = 0.0
    #: The gate also reads the detached class margin d = z1 - z0 through weights on (d, |d|)
    #: (phase 3+ gated heads; model/head.py): off, those weights stay frozen at zero.
    gate_margin_input: bool = False
    #: Calibration of the gate score on val_calib (phase 3+).
    gate_calibration: Literal["platt", "isotonic", "none"] = "platt"
    #: Required val_test coverage gain of the gate policy over the softmax policy (phase 3 gate):
    #: the paired bootstrap CI's lower end of the gain must exceed it.
    gate_min_gain: float = 0.0
    #: Required val_test AUGRC gain of the SAM/F-SAM run over the AdamW run (phase 5 gate): the
    #: paired bootstrap CI's lower end of (AUGRC AdamW - AUGRC F-SAM) must exceed it.
    fsam_min_gain: float = 0.0
    use_dirichlet: bool = False
    calibration_iters: int = 300
    #: Memory budget of a training step (peak RSS; CUDA max allocated on a GPU), judged by the
    #: phase 4/5 gates.
    memory_budget_gb: float = 16.0

    # Phase 4: ExPLoRA continued pre-training of the backbone, then PEFT fine-tuning on images.
    #: Extra unlabeled images for ExPLoRA (besides the train split's images, labels unused).
    unlabeled_image_dir: str | None = None
    explora_epochs: int = 2
    explora_r: int = 8
    explora_unfrozen_blocks: int = 1
    explora_mask_ratio: float = 0.75
    explora_lr: float = 2e-4
    explora_batch_size: int = 32
    #: Cap on pre-training images (a fixed random subset; null = all).
    explora_max_images: int | None = None
    #: Held-out train images for the reconstruction-gain criterion (never val images).
    explora_held_out_images: int = 64
    #: Relative held-out reconstruction-loss reduction the phase-4 gate requires.
    explora_min_gain: float = 0.05
    #: Epochs of image-based fine-tuning (adapters + heads) in phases 4-5 (``mode: train``).
    finetune_epochs: int = 3
    #: Cap on fine-tuning train images per epoch (a fixed random subset; null = all).
    finetune_max_images: int | None = None
    #: The heads' learning rate while fine-tuning is lr_head times this (the probe-trained head only
    #: needs to follow the adapters; LP-FT practice).
    finetune_head_lr_scale: float = 0.1
    #: Recompute the backbone blocks' activations in backward (Hugging Face activation
    #: checkpointing) in PEFT fine-tuning and ExPLoRA: less memory, ~1 more forward pass, same results.
    gradient_checkpointing: bool = False

    # Phase 5: SAM / Friendly-SAM.
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    fsam_sigma: float = 1.0
    fsam_lmbda: float = 0.9
    #: Layer-wise learning-rate decay for backbone adapters (1.0 = off).
    layer_lr_decay: float = 1.0
    #: A step loss above this factor times the running median counts as a spike (phase 5 gate;
    #: for losses that can be negative, see ``gates.loss_spikes``).
    loss_spike_factor: float = 5.0

    # Phase 6: conformal risk training, Dirichlet calibration, SCRC.
    crt_weight: float = 1.0
    crt_temperature: float = 0.1
    crt_fraction: float = 0.5
    #: Batch of cached features for conformal risk training: each half needs enough positives for the
    #: in-batch FNR calibration (only the ``crt`` loss uses it; other losses use max_batch_size).
    crt_batch_size: int = 512
    dirichlet_lambda: float = 1e-3
    dirichlet_mu: float = 1e-3
    scrc_variant: Literal["I", "T"] = "I"
    #: Published bundle versions kept per phase (the current one included); an older one is removed
    #: at a later publish, and only when no reader holds it.
    bundle_keep_versions: int = 3

    # Provenance (written by save()).
    created_at: str | None = None
    git_commit: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _translate_input(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        hits = _find_key(data, "target_coverage")
        if hits:
            raise ValueError(f"{', '.join(hits)}: {TARGET_COVERAGE_REFUSAL}")
        data = dict(data)
        for retired in RETIRED_FIELDS:
            data.pop(retired, None)
        for old, new in LEGACY_ALIASES.items():
            if old in data:
                if new in data and data[new] != data[old]:
                    raise ValueError(
                        f"both {old}={data[old]!r} (old name) and {new}={data[new]!r} are set; keep only {new}"
                    )
                data[new] = data.pop(old)
        return data

    @model_validator(mode="after")
    def _check_ranges(self) -> "Stage1ProConfig":
        problems = self.range_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ----- validation -------------------------------------------------------------------

    @property
    def delta(self) -> float:
        """Allowed probability that the certified FNR bound is wrong (1 - fnr_confidence)."""
        return 1.0 - self.fnr_confidence

    def range_problems(self) -> list[str]:
        """Every field outside its allowed range, as ``field=value: rule`` messages."""
        nonfinite = [name for name, value in self if isinstance(value, float) and not math.isfinite(value)]
        p: list[str] = [f"{name}={getattr(self, name)!r} is invalid: must be a finite number" for name in nonfinite]

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok and name not in nonfinite:
                p.append(f"{name}={getattr(self, name)!r} is invalid: must be {rule}")

        need(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)")
        for name in ("lr_head", "lr_backbone"):
            need(getattr(self, name) > 0 and math.isfinite(getattr(self, name)), name, "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "> 0")
        need(self.epochs > 0, "epochs", "> 0")
        need(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", f"in [0, epochs={self.epochs})")
        need(self.max_batch_size > 0, "max_batch_size", "> 0")
        need(self.bundle_keep_versions >= 1, "bundle_keep_versions", ">= 1")
        need(
            0 < self.fallback_batch_size <= self.max_batch_size,
            "fallback_batch_size",
            f"in [1, max_batch_size={self.max_batch_size}]",
        )
        need(self.grad_accum_steps >= 1, "grad_accum_steps", ">= 1")
        need(0.0 < self.ema_decay < 1.0, "ema_decay", "in (0, 1)")
        need(self.early_stop_patience >= 1, "early_stop_patience", ">= 1")
        need(0.5 <= self.legacy_exit_threshold_for_logging <= 1.0, "legacy_exit_threshold_for_logging", "in [0.5, 1]")
        need(self.num_workers is None or self.num_workers >= 0, "num_workers", ">= 0 or null (auto)")
        need(self.world_size >= 1, "world_size", ">= 1")
        need(1 <= self.phase <= 6, "phase", "an integer in [1, 6]")
        need(self.synthetic_n_train >= 10, "synthetic_n_train", ">= 10")
        need(self.synthetic_n_val >= 30, "synthetic_n_val", ">= 30")
        ratios = ("val_select_ratio", "val_calib_ratio", "val_test_ratio")
        for name in ratios:
            need(0.0 < getattr(self, name) < 1.0, name, "in (0, 1)")
        total = sum(getattr(self, n) for n in ratios)
        if not any(n in nonfinite for n in ratios) and abs(total - 1.0) > 1e-6:
            p.append(
                f"val_select_ratio + val_calib_ratio + val_test_ratio = {total:.6g} is invalid: must sum to 1"
            )
        need(0.0 < self.target_fnr_exit <= 0.1, "target_fnr_exit", "in (0, 0.1]")
        need(0.5 < self.fnr_confidence < 1.0, "fnr_confidence", "in (0.5, 1) (delta = 1 - fnr_confidence < 0.5)")
        need(self.bootstrap_samples >= 100, "bootstrap_samples", ">= 100")
        need(0.5 <= self.bootstrap_confidence < 1.0, "bootstrap_confidence", "in [0.5, 1)")
        need(0.0 < self.deploy_prior < 1.0, "deploy_prior", "in (0, 1)")
        need(0 <= self.train_views <= 8, "train_views", "in [0, 8] (each view costs a forward pass per training image)")
        need(self.deploy_seed >= 0, "deploy_seed", ">= 0")
        need(
            self.baseline_val_accuracy is None or 0.0 <= self.baseline_val_accuracy <= 1.0,
            "baseline_val_accuracy",
            "in [0, 1] (a fraction, not a percentage) or null",
        )
        need(
            self.selection_accuracy_tolerance is None or 0.0 <= self.selection_accuracy_tolerance <= 0.2,
            "selection_accuracy_tolerance",
            "in [0, 0.2] or null",
        )
        need(self.peft_r >= 1, "peft_r", ">= 1")
        need(self.peft_blocks >= 0, "peft_blocks", ">= 0")
        need(self.gate_loss_weight >= 0, "gate_loss_weight", ">= 0")
        need(self.gate_fnr_penalty >= 0, "gate_fnr_penalty", ">= 0")
        need(self.gate_risk_weight >= 0, "gate_risk_weight", ">= 0")
        need(self.gate_miss_temperature >= 0, "gate_miss_temperature", ">= 0")
        need(self.gate_correct_weight >= 0, "gate_correct_weight", ">= 0")
        need(-1.0 < self.gate_min_gain < 1.0, "gate_min_gain", "in (-1, 1)")
        need(0.0 <= self.fsam_min_gain < 1.0, "fsam_min_gain", "in [0, 1)")
        for name in ("accuracy_margin", "coverage_margin", "exit_accuracy_margin", "calibration_margin",
                     "baseline_margin"):
            need(0.0 <= getattr(self, name) <= 0.2, name, "in [0, 0.2] (a share: 0.01 is one point)")
        need(0.0 < self.val_test_alpha < 0.5, "val_test_alpha", "in (0, 0.5)")
        need(self.aux_weight >= 0, "aux_weight", ">= 0")
        need(self.calibration_iters >= 1, "calibration_iters", ">= 1")
        need(self.memory_budget_gb > 0, "memory_budget_gb", "> 0")
        need(self.explora_epochs >= 1, "explora_epochs", ">= 1")
        need(self.explora_r >= 0, "explora_r", ">= 0 (0 = no LoRA, unfrozen blocks only)")
        need(self.explora_unfrozen_blocks >= 0, "explora_unfrozen_blocks", ">= 0")
        need(0.0 < self.explora_mask_ratio < 1.0, "explora_mask_ratio", "in (0, 1)")
        need(self.explora_lr > 0, "explora_lr", "> 0")
        need(self.explora_batch_size >= 1, "explora_batch_size", ">= 1")
        need(self.explora_max_images is None or self.explora_max_images >= 1, "explora_max_images", ">= 1 or null")
        need(self.explora_held_out_images >= 1, "explora_held_out_images", ">= 1")
        need(0.0 <= self.explora_min_gain < 1.0, "explora_min_gain", "in [0, 1)")
        need(self.finetune_epochs >= 1, "finetune_epochs", ">= 1")
        need(0.0 < self.finetune_head_lr_scale <= 1.0, "finetune_head_lr_scale", "in (0, 1]")
        need(self.finetune_max_images is None or self.finetune_max_images >= 1, "finetune_max_images", ">= 1 or null")
        need(self.sam_rho > 0, "sam_rho", "> 0")
        need(self.fsam_sigma >= 0, "fsam_sigma", ">= 0")
        need(0.0 <= self.fsam_lmbda < 1.0, "fsam_lmbda", "in [0, 1)")
        need(0.0 < self.layer_lr_decay <= 1.0, "layer_lr_decay", "in (0, 1] (1.0 = off)")
        need(self.loss_spike_factor > 1.0, "loss_spike_factor", "> 1")
        need(self.crt_weight >= 0, "crt_weight", ">= 0")
        need(self.crt_temperature > 0, "crt_temperature", "> 0")
        need(0.0 < self.crt_fraction < 1.0, "crt_fraction", "in (0, 1)")
        need(self.crt_batch_size >= 2, "crt_batch_size", ">= 2")
        need(self.dirichlet_lambda >= 0, "dirichlet_lambda", ">= 0")
        need(self.dirichlet_mu >= 0, "dirichlet_mu", ">= 0")
        if self.model_path.startswith(BUILTIN_PREFIX):
            name = self.model_path[len(BUILTIN_PREFIX):]
            need(name in BUILTIN_BACKBONES, "model_path", f"a directory or one of {[BUILTIN_PREFIX + b for b in BUILTIN_BACKBONES]}")
        names = exit_policy_names()
        allowed = POLICIES_BY_PHASE.get(self.phase, ())
        if self.exit_policy not in names:
            p.append(f"exit_policy={self.exit_policy!r}: unknown exit policy; choose one of {list(names)}")
        elif allowed and self.exit_policy not in allowed:
            phases = [n for n, recipe in PHASES.items() if self.exit_policy in recipe.exit_policies]
            p.append(
                f"exit_policy={self.exit_policy!r} is invalid for phase {self.phase}: allowed {list(allowed)} "
                f"({self.exit_policy!r} only in phases {phases})"
            )
        optimizers = OPTIMIZERS_BY_PHASE.get(self.phase, ())
        if optimizers and self.optimizer not in optimizers:
            p.append(
                f"optimizer={self.optimizer!r} is invalid for phase {self.phase}: its row trains with "
                f"{' or '.join(optimizers)} (SAM / F-SAM are phase 5's part; set phase: 5 to use them, "
                f"or leave optimizer at adamw - each phase's row decides its optimizer)"
            )
        return p

    def dataset_paths(self) -> dict[str, str | None]:
        """The data paths this config needs, by field name."""
        if self.data_source == "synthetic":
            return {}
        paths: dict[str, str | None] = {
            "train_image_dir": self.train_image_dir,
            "train_labels_file": self.train_labels_file,
            "val_image_dir": self.val_image_dir,
            "val_labels_file": self.val_labels_file,
        }
        if self.use_extra_roadwork:
            paths["roadwork_iccv_dir"] = self.roadwork_iccv_dir
            paths["roadwork_extra_dir"] = self.roadwork_extra_dir
        if self.use_kaggle_data:
            paths["kaggle_construction_dir"] = self.kaggle_construction_dir
            paths["kaggle_road_issues_dir"] = self.kaggle_road_issues_dir
        return paths

    def dataset_problems(self) -> list[str]:
        """Every missing dataset path at once (empty when all exist)."""
        problems = []
        for name, value in self.dataset_paths().items():
            if self.skip_missing_sources and name in OPTIONAL_SOURCE_FIELDS:
                continue  # an absent optional source is left out and named (data/sources.py)
            if not value:
                problems.append(f"{name} is not set (data_source='natix' needs it)")
            elif not Path(value).exists():
                problems.append(f"{name}={value!r} does not exist")
        return problems

    def mode_problems(self) -> list[str]:
        """Mode compatibility: train_cached needs an existing feature cache."""
        if self.mode != "train_cached":
            return []
        if not self.cached_features_dir:
            return ["mode='train_cached' needs cached_features_dir (run mode='extract_features' first)"]
        cache = Path(self.cached_features_dir)
        missing = [f for f in ("train_features.pt", "train_labels.pt") if not (cache / f).is_file()]
        if missing:
            return [
                f"mode='train_cached' needs an existing cache: {cache} lacks {', '.join(missing)} "
                f"(run mode='extract_features' first)"
            ]
        return []

    def validate_for_run(self) -> None:
        """Check what only the file system can tell (datasets, cache); raise ConfigError listing all."""
        problems = self.dataset_problems() + self.mode_problems()
        if problems:
            raise ConfigError(problems)

    # ----- construction and persistence -------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> "Stage1ProConfig":
        """Build from a plain dict; raise ConfigError with one line per problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = _format_validation_error(exc)
            bad = {str(err["loc"][0]) for err in exc.errors() if err.get("loc")}
        except (ValueError, TypeError, RecursionError) as exc:  # a value pydantic cannot even inspect
            raise ConfigError([f"unreadable configuration ({type(exc).__name__}: {exc})"], source) from None
        if bad and isinstance(data, dict):
            # Range rules run only on a fully typed config: check the other fields on their own,
            # leaving out rules that mention a field already reported.
            rest = {k: v for k, v in data.items() if k not in bad}
            try:
                cls.model_validate(rest)
            except ValidationError as again:
                mentions = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(bad))) + r")\b")
                problems += [q for q in _format_validation_error(again) if q not in problems and not mentions.search(q)]
            except (ValueError, TypeError, RecursionError):
                pass
        raise ConfigError(problems, source) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Stage1ProConfig":
        """Load a YAML or JSON config file (JSON files are schema-validated)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        if path.suffix.lower() == ".json":
            return cls.load(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError([f"not valid YAML: {exc}"], where) from None
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # e.g. an int with > 4300 digits
            raise ConfigError([f"unreadable YAML ({type(exc).__name__}: {_short_repr(str(exc), 200)})"], path) from None
        if not isinstance(data, dict):
            raise ConfigError(["top level must be a mapping of field: value"], path)
        return cls.from_dict(data, source=path)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict with the baseline key names (what config.json holds)."""
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        """Write config.json atomically, stamped with created_at and git commit."""
        data = self.to_json_dict()
        data["created_at"] = data.get("created_at") or _dt.datetime.now(_dt.timezone.utc).isoformat()
        data["git_commit"] = data.get("git_commit") or git_commit()
        return write_json(path, data, schema="config")

    @classmethod
    def _upgrade_saved(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config.json saved by an earlier release, read today: retired fields dropped, fields it
        predates filled with their defaults (a new field's default is the earlier behaviour), so an
        older bundle still loads; every field it does hold is validated as written."""
        data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
        for name, field in cls.model_fields.items():
            if name not in data and not field.is_required():
                data[name] = field.get_default(call_default_factory=True)
        return data

    @classmethod
    def load(cls, path: str | Path) -> "Stage1ProConfig":
        """Read config.json, validate it against config.schema.json and the model."""
        from stage1_core.artifacts import ArtifactError

        try:
            data = read_json(path)
        except ArtifactError:
            raise
        except (ValueError, RecursionError) as exc:  # e.g. an int with > 4300 digits, nesting too deep
            raise ConfigError([f"unreadable JSON ({type(exc).__name__}: {_short_repr(str(exc), 200)})"], path) from None
        if isinstance(data, dict):
            for old, new in LEGACY_ALIASES.items():
                if old in data and new not in data:
                    data[new] = data.pop(old)
            if _find_key(data, "target_coverage"):
                raise ConfigError([TARGET_COVERAGE_REFUSAL], path)
            data = cls._upgrade_saved(data)
        from stage1_core.artifacts import schema_errors

        problems = schema_errors(data, "config")
        if problems:
            # The schema knows types and simple bounds; the model also knows finiteness and
            # cross-field rules. Report both, so one reading names every bad field.
            if isinstance(data, dict):
                named = {re.split(r"[.\[:]", q.removeprefix("$."), maxsplit=1)[0] for q in problems}
                try:
                    cls.from_dict(data)
                except ConfigError as exc:
                    problems += [q for q in exc.problems if re.split(r"[=:]", q, maxsplit=1)[0] not in named]
            listed = "\n  ".join(problems)
            raise ArtifactError(f"{path}: does not match config.schema.json:\n  {listed}")
        return cls.from_dict(data, source=path)

    def with_updates(self, **changes: Any) -> "Stage1ProConfig":
        """A validated copy with ``changes`` applied."""
        data = self.model_dump()
        data.update(changes)
        return type(self).from_dict(data)


#: Simple per-field bounds, mirrored into config.schema.json (cross-field rules stay in code).
SCHEMA_BOUNDS: dict[str, dict[str, float]] = {
    "dropout": {"minimum": 0, "exclusiveMaximum": 1},
    "label_smoothing": {"minimum": 0, "exclusiveMaximum": 1},
    "lr_head": {"exclusiveMinimum": 0},
    "lr_backbone": {"exclusiveMinimum": 0},
    "weight_decay": {"minimum": 0},
    "max_grad_norm": {"exclusiveMinimum": 0},
    "epochs": {"minimum": 1},
    "warmup_epochs": {"minimum": 0},
    "max_batch_size": {"minimum": 1},
    "fallback_batch_size": {"minimum": 1},
    "grad_accum_steps": {"minimum": 1},
    "world_size": {"minimum": 1},
    "ema_decay": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "early_stop_patience": {"minimum": 1},
    "legacy_exit_threshold_for_logging": {"minimum": 0.5, "maximum": 1},
    "phase": {"minimum": 1, "maximum": 6},
    "val_select_ratio": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "val_calib_ratio": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "val_test_ratio": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "target_fnr_exit": {"exclusiveMinimum": 0, "maximum": 0.1},
    "fnr_confidence": {"exclusiveMinimum": 0.5, "exclusiveMaximum": 1},
    "val_test_alpha": {"exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
    "gate_fnr_penalty": {"minimum": 0},
    "gate_risk_weight": {"minimum": 0},
    "gate_miss_temperature": {"minimum": 0},
    "gate_correct_weight": {"minimum": 0},
    "bootstrap_samples": {"minimum": 100},
    "bootstrap_confidence": {"minimum": 0.5, "exclusiveMaximum": 1},
    "deploy_prior": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "train_views": {"minimum": 0, "maximum": 8},
    "deploy_seed": {"minimum": 0},
    "peft_r": {"minimum": 1},
    "peft_blocks": {"minimum": 0},
    "calibration_iters": {"minimum": 1},
    "memory_budget_gb": {"exclusiveMinimum": 0},
    "accuracy_margin": {"minimum": 0, "maximum": 0.2},
    "coverage_margin": {"minimum": 0, "maximum": 0.2},
    "exit_accuracy_margin": {"minimum": 0, "maximum": 0.2},
    "calibration_margin": {"minimum": 0, "maximum": 0.2},
    "baseline_margin": {"minimum": 0, "maximum": 0.2},
    "fsam_min_gain": {"minimum": 0, "exclusiveMaximum": 1},
    "explora_epochs": {"minimum": 1},
    "explora_r": {"minimum": 0},
    "explora_unfrozen_blocks": {"minimum": 0},
    "explora_mask_ratio": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "explora_lr": {"exclusiveMinimum": 0},
    "explora_batch_size": {"minimum": 1},
    "explora_max_images": {"minimum": 1},
    "explora_held_out_images": {"minimum": 1},
    "explora_min_gain": {"minimum": 0, "exclusiveMaximum": 1},
    "finetune_epochs": {"minimum": 1},
    "finetune_max_images": {"minimum": 1},
    "finetune_head_lr_scale": {"exclusiveMinimum": 0, "maximum": 1},
    "sam_rho": {"exclusiveMinimum": 0},
    "fsam_sigma": {"minimum": 0},
    "fsam_lmbda": {"minimum": 0, "exclusiveMaximum": 1},
    "layer_lr_decay": {"exclusiveMinimum": 0, "maximum": 1},
    "loss_spike_factor": {"exclusiveMinimum": 1},
    "crt_weight": {"minimum": 0},
    "crt_temperature": {"exclusiveMinimum": 0},
    "crt_fraction": {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "crt_batch_size": {"minimum": 2},
    "dirichlet_lambda": {"minimum": 0},
    "dirichlet_mu": {"minimum": 0},
    "bundle_keep_versions": {"minimum": 1},
}


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of a saved config.json, derived from the model (see schemas/config.schema.json)."""
    schema = Stage1ProConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "stage1-pro/config.schema.json"
    schema["description"] = "A saved Stage-1 Pro run configuration (config.json)."
    schema["additionalProperties"] = False
    schema["required"] = sorted(schema["properties"])
    for name, bounds in SCHEMA_BOUNDS.items():
        prop = schema["properties"][name]
        prop.pop("default", None)
        if "anyOf" in prop:
            for option in prop["anyOf"]:
                if option.get("type") in ("number", "integer"):
                    option.update(bounds)
        else:
            prop.update(bounds)
    schema["properties"]["exit_policy"].update({"x-choices": "exit_policy", "enum": list(exit_policy_names())})
    for prop in schema["properties"].values():
        prop.pop("default", None)
    return schema


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err.get("type") == "extra_forbidden":
            problems.append(f"{loc}: unknown field (value {_short_repr(err.get('input'))}); check the spelling")
        elif loc:
            problems.append(f"{loc}={_short_repr(err.get('input'))}: {msg}")
        else:
            problems.extend(part.strip() for part in msg.split("\n") if part.strip())
    return problems
