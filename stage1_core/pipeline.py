"""The pipeline's steps as plain functions over an artifacts directory (no Dagster).

Each step lives in its own module under :mod:`stage1_core.steps` and is re-exported here, so the
Dagster assets in ``stage1_assets`` and the tests have one import. Steps are phase-agnostic: the
phase's recipe (``phases.py``) names the head, loss and exit policy, and registries
(:mod:`stage1_core.training.recipes`, :data:`stage1_core.policies.POLICIES`,
:data:`stage1_core.acceptance.READERS`) supply the parts. Every step checks the lineage of its
inputs (:mod:`stage1_core.lineage`) before it reads them.

Split usage is enforced here: ``train`` fits weights, ``val_select`` selects checkpoints,
``val_calib`` fits the exit policy, ``val_test`` only evaluates (``require_role`` on the rows'
sample ids, and ``FitInputs.take`` in every policy fit).

The re-exports load lazily (PEP 562 module ``__getattr__``): importing this module costs
nothing, and a name pulls in its step module (torch, transformers, scikit-learn ...) on first
use. The Dagster code location imports it, so ``dagster`` commands and every run start without
the heavy libraries, and a run imports only what its steps use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "evaluate_criterion": "stage1_core.acceptance.verdicts",
    **dict.fromkeys(("cache_features", "load_split", "load_split_features", "prepare_backbone"),
                    "stage1_core.steps.backbone"),
    **dict.fromkeys(("compare_bundle_decisions", "current_bundle_problems", "export_phase_bundle"),
                    "stage1_core.steps.bundle"),
    **dict.fromkeys(("bundle_dir", "read_metrics_csv", "read_training"), "stage1_core.store"),
    **dict.fromkeys(("Layout", "StepContext", "StepResult"), "stage1_core.steps.context"),
    **dict.fromkeys(("build_dataset_index", "build_splits", "read_dataset_index", "read_splits"),
                    "stage1_core.steps.data"),
    "evaluate_phase": "stage1_core.steps.evaluation",
    **dict.fromkeys(("build_predictor", "fit_exit_policy"), "stage1_core.steps.policy"),
    **dict.fromkeys(("phase_status", "read_phase_summary"), "stage1_core.steps.summary"),
    **dict.fromkeys(("load_head", "load_predictions", "log_row", "predict_splits", "train_phase"),
                    "stage1_core.steps.training"),
}

__all__ = sorted(_EXPORTS)

#: Every module behind the re-exports (what a forkserver preloads so forked steps import nothing).
STEP_MODULES: tuple[str, ...] = tuple(sorted(set(_EXPORTS.values())))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static tools see the real names
    from stage1_core.acceptance.verdicts import evaluate_criterion
    from stage1_core.steps.backbone import cache_features, load_split, load_split_features, prepare_backbone
    from stage1_core.steps.bundle import compare_bundle_decisions, current_bundle_problems, export_phase_bundle
    from stage1_core.steps.context import Layout, StepContext, StepResult
    from stage1_core.steps.data import build_dataset_index, build_splits, read_dataset_index, read_splits
    from stage1_core.steps.evaluation import evaluate_phase
    from stage1_core.steps.policy import build_predictor, fit_exit_policy
    from stage1_core.steps.summary import phase_status, read_phase_summary
    from stage1_core.steps.training import load_head, load_predictions, log_row, predict_splits, train_phase
    from stage1_core.store import bundle_dir, read_metrics_csv, read_training
