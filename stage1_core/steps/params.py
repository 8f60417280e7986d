"""The config values each asset's result depends on, recorded in its lineage.

When the live config asks for other values than an artifact was made with, that artifact is
stale: its consumers refuse it, naming the setting (e.g. "exit_policy[phase1] was made with
target_fnr=0.02 (config now 0.1)"). Settings that only change speed (batch size, workers) are
left out, so changing them does not invalidate anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stage1_core.config import Stage1ProConfig
from stage1_core.lineage import parse_name
from stage1_core.phases import config_for_phase, get_recipe

DATA_FIELDS = (
    "data_source", "train_image_dir", "train_labels_file", "val_image_dir", "val_labels_file",
    "use_extra_roadwork", "roadwork_iccv_dir", "roadwork_extra_dir", "use_kaggle_data",
    "kaggle_construction_dir", "kaggle_road_issues_dir", "skip_corrupt",
)
SYNTHETIC_FIELDS = ("synthetic_n_train", "synthetic_n_val", "synthetic_seed")
SPLIT_FIELDS = ("split_seed", "val_select_ratio", "val_calib_ratio", "val_test_ratio")
TRAINING_FIELDS = (
    "mode", "epochs", "warmup_epochs", "lr_head", "weight_decay", "dropout", "label_smoothing",
    "class_weighting", "max_grad_norm", "use_ema", "ema_decay", "ema_warmup", "standardize_features", "early_stop_patience",
    "grad_accum_steps", "seed", "selection_metric", "gate_loss_weight", "aux_weight", "gate_fnr_penalty",
    "gate_risk_weight", "gate_miss_temperature", "gate_correct_weight", "gate_margin_input", "target_fnr_exit",
    "optimizer",
)
#: Phases that fine-tune backbone adapters on images (``train_mode == "finetune"``).
FINETUNE_FIELDS = (
    "peft_type", "peft_r", "peft_blocks", "lr_backbone", "layer_lr_decay", "finetune_epochs", "finetune_max_images",
    "finetune_head_lr_scale", "augmentation", "max_batch_size", "fallback_batch_size",
)
#: Settings a gate criterion reads (a threshold, margin or reading of its rule), recorded with the
#: asset the criterion judges in the phases whose gate has it: changing one makes that asset, and so
#: its verdict, stale (its consumers refuse it, naming the setting) instead of loosening a passed
#: gate silently.
CRITERION_FIELDS = {
    "val_accuracy_vs_baseline": ("baseline_val_accuracy", "baseline_margin"),
    "no_regression_vs_previous_phase": ("accuracy_margin", "coverage_margin"),
    "gate_beats_softmax": ("gate_min_gain",),
    "no_classification_regression": ("accuracy_margin", "exit_accuracy_margin"),
    "gate_calibration_works": ("calibration_margin",),
    "performance_maintained": ("accuracy_margin", "coverage_margin"),
    "no_memory_issues": ("memory_budget_gb",),
    "training_stable": ("loss_spike_factor",),
    "improves_over_adamw": ("fsam_min_gain", "coverage_margin"),
    "risk_training_works": ("coverage_margin",),
    "coverage_maximised": ("coverage_margin",),
}
#: SAM / F-SAM settings (only when ``optimizer`` is not AdamW).
SAM_FIELDS = ("sam_rho", "sam_adaptive", "fsam_sigma", "fsam_lmbda")
EXPLORA_FIELDS = (
    "explora_epochs", "explora_r", "explora_unfrozen_blocks", "explora_mask_ratio", "explora_lr",
    "explora_batch_size", "explora_max_images", "explora_held_out_images", "explora_min_gain",
    "unlabeled_image_dir", "seed",
)
#: Settings every exit policy's certificate depends on; a policy adds its own (``ExitPolicy.settings``).
POLICY_FIELDS = ("exit_policy", "target_fnr_exit", "fnr_confidence", "gate_calibration")
#: Conformal risk training (only for the ``crt`` loss).
CRT_FIELDS = ("crt_weight", "crt_temperature", "crt_fraction", "crt_batch_size")
EVALUATION_FIELDS = ("bootstrap_samples", "bootstrap_confidence", "deploy_prior", "val_test_check", "val_test_alpha")


def _pick(cfg: Stage1ProConfig, fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in fields}


def _dataset_index(cfg: Stage1ProConfig) -> dict[str, Any]:
    fields = DATA_FIELDS + (SYNTHETIC_FIELDS if cfg.data_source == "synthetic" else ())
    return _pick(cfg, fields)


def _backbone(cfg: Stage1ProConfig) -> dict[str, Any]:
    recipe = get_recipe(cfg.phase)
    params: dict[str, Any] = {"model_path": cfg.model_path, "adaptation": recipe.backbone}
    if recipe.backbone_kind == "explora":
        params.update(_pick(cfg, EXPLORA_FIELDS))
    return params


def _checkpoint(cfg: Stage1ProConfig) -> dict[str, Any]:
    recipe = get_recipe(cfg.phase)
    params = {**_pick(cfg, TRAINING_FIELDS), "phase": cfg.phase}
    if recipe.train_mode == "finetune":
        params.update(_pick(cfg, FINETUNE_FIELDS))
    if cfg.optimizer != "adamw":
        params.update(_pick(cfg, SAM_FIELDS))
    if recipe.loss_kind == "crt":
        params.update(_pick(cfg, CRT_FIELDS))
    if cfg.selection_accuracy_tolerance is not None:  # recorded only when set: older checkpoints stay current
        params["selection_accuracy_tolerance"] = cfg.selection_accuracy_tolerance
    params.update(_criterion_params(cfg, "checkpoint"))
    return params


def _criterion_params(cfg: Stage1ProConfig, asset: str) -> dict[str, Any]:
    """The :data:`CRITERION_FIELDS` of the phase's criteria that judge ``asset``."""
    params: dict[str, Any] = {}
    for criterion in get_recipe(cfg.phase).criteria:
        if criterion.asset == asset:
            params.update(_pick(cfg, CRITERION_FIELDS.get(criterion.name, ())))
    return params


def _exit_policy(cfg: Stage1ProConfig) -> dict[str, Any]:
    from stage1_core.policies import policy_class  # scipy: the code location imports this module

    return {**_pick(cfg, POLICY_FIELDS), **_pick(cfg, policy_class(cfg.exit_policy).settings)}


def _deployment(cfg: Stage1ProConfig) -> dict[str, Any]:
    """The deployment pipeline's settings (nothing for ``none``, so clean-only ids stay as they were)."""
    if cfg.deploy_pipeline == "none":
        return {}
    from stage1_core.data.challenge import PIPELINE_ID

    return {"deploy_pipeline": PIPELINE_ID, "deploy_seed": cfg.deploy_seed, "train_views": cfg.train_views}


PARAMS: dict[str, Callable[[Stage1ProConfig], dict[str, Any]]] = {
    "dataset_index": _dataset_index,
    "splits": lambda cfg: _pick(cfg, SPLIT_FIELDS),
    "backbone": _backbone,
    "cached_features": lambda cfg: _deployment(cfg),
    "checkpoint": _checkpoint,
    "predictions": lambda cfg: {},
    "exit_policy": _exit_policy,
    "evaluation": lambda cfg: {**_pick(cfg, EVALUATION_FIELDS), **_criterion_params(cfg, "evaluation")},
    "bundle": lambda cfg: {},
}


def params_for(asset: str, cfg: Stage1ProConfig) -> dict[str, Any]:
    """The settings ``asset`` depends on, read from an already phase-applied config."""
    return PARAMS[asset](cfg)


def expected_params(name: str, config: Stage1ProConfig) -> dict[str, Any] | None:
    """What the live config asks of the asset named ``name`` (``"checkpoint[phase1]"``)."""
    asset, partition = parse_name(name)
    if asset not in PARAMS:
        return None
    try:
        cfg = config_for_phase(config, partition) if partition else config
    except Exception:  # noqa: BLE001 - a phase that cannot run asks nothing of its artifacts
        return None
    return params_for(asset, cfg)
