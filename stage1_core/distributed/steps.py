"""A pipeline step run by every rank of a ``torchrun`` job.

Rank 0 runs the step itself (inputs checked, files and lineage record written, result
returned); the other ranks run only the step's collective part - the same extraction or
training calls, in the same order, with the same arguments - so the trainers and the
extractor can share the work. Each entry names both halves, so they cannot drift apart: the
worker half calls the very function the step calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stage1_core.distributed import env

#: Assets whose work grows with the data and runs on several ranks when ``world_size > 1``.
DISTRIBUTED_ASSETS = ("backbone", "cached_features", "checkpoint")


def _features_worker(config: Any, layout: Any, partition: str) -> None:
    from stage1_core.phases import config_for_phase
    from stage1_core.steps.backbone import ensure_phase_features
    from stage1_core.store import read_backbone

    # The same call cache_features makes: clean splits and, pipeline on, the challenge views.
    ensure_phase_features(config_for_phase(config, partition), layout, read_backbone(layout, partition))


def _backbone_worker(config: Any, layout: Any, partition: str) -> None:
    from stage1_core.model.backbone import resolve_backbone
    from stage1_core.phases import config_for_phase, get_recipe
    from stage1_core.steps.adaptation import adapt_with_explora
    from stage1_core.steps.data import read_splits

    if get_recipe(partition).backbone_kind != "explora":
        return  # resolving or reading a backbone is rank 0's alone
    cfg = config_for_phase(config, partition)
    splits, index = read_splits(layout)
    adapt_with_explora(cfg, resolve_backbone(cfg.model_path, layout.root), layout.root, splits, index)


def _checkpoint_worker(config: Any, layout: Any, partition: str) -> None:
    from stage1_core.phases import config_for_phase
    from stage1_core.steps.training import fit_phase

    fit_phase(config_for_phase(config, partition), layout, partition)


def _steps() -> dict[str, tuple[Callable[..., Any], Callable[..., None]]]:
    from stage1_core import pipeline

    return {
        "backbone": (pipeline.prepare_backbone, _backbone_worker),
        "cached_features": (pipeline.cache_features, _features_worker),
        "checkpoint": (pipeline.train_phase, _checkpoint_worker),
    }


def run_distributed_step(asset: str, config: Any, layout: Any, partition: str) -> Any:
    """Rank 0: the step's :class:`~stage1_core.steps.context.StepResult`; other ranks: None.

    A rank that fails exits non-zero and ``torchrun`` stops the others, so no rank waits for ever.
    """
    steps = _steps()
    if asset not in steps:
        raise ValueError(f"{asset!r} does not run on several ranks; distributed assets: {list(DISTRIBUTED_ASSETS)}")
    step, worker = steps[asset]
    if env.is_main():
        return step(config, layout, partition)
    worker(config, layout, partition)
    return None
