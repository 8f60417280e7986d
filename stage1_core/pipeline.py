"""The pipeline's steps as plain functions over an artifacts directory (no Dagster).

Each step lives in its own module under :mod:`stage1_core.steps` and is re-exported here, so the
Dagster assets in ``stage1_assets`` and the tests have one import. Steps are phase-agnostic: the
phase's recipe (``phases.py``) names the head, loss and exit policy, and registries
(:mod:`stage1_core.training.recipes`, :data:`stage1_core.steps.policy.POLICY_FITTERS`,
:data:`stage1_core.criteria.REGISTRY`) supply the parts. Every step checks the lineage of its
inputs (:mod:`stage1_core.lineage`) before it reads them.

Split usage is enforced here: ``train`` fits weights, ``val_select`` selects checkpoints,
``val_calib`` fits the exit policy, ``val_test`` only evaluates (``require_split``).
"""

from stage1_core.criteria import baseline_accuracy, evaluate_criterion
from stage1_core.steps.backbone import cache_features, load_split, load_split_features, prepare_backbone
from stage1_core.steps.bundle import bundle_dir, compare_bundle_decisions, current_bundle_problems, export_phase_bundle
from stage1_core.steps.context import Layout, StepContext, StepResult
from stage1_core.steps.data import build_dataset_index, build_splits, read_dataset_index, read_splits
from stage1_core.steps.evaluation import evaluate_phase, read_metrics_csv
from stage1_core.steps.policy import build_predictor, fit_exit_policy
from stage1_core.steps.summary import phase_status, read_phase_summary
from stage1_core.steps.training import load_head, load_predictions, log_row, predict_splits, read_training, train_phase

__all__ = [
    "Layout", "StepContext", "StepResult", "baseline_accuracy", "build_dataset_index", "build_predictor",
    "build_splits", "bundle_dir", "cache_features", "compare_bundle_decisions", "current_bundle_problems",
    "evaluate_criterion", "evaluate_phase", "export_phase_bundle", "fit_exit_policy", "load_head",
    "load_predictions", "load_split", "load_split_features", "log_row", "phase_status", "predict_splits",
    "prepare_backbone", "read_dataset_index", "read_metrics_csv", "read_phase_summary", "read_splits",
    "read_training", "train_phase",
]
