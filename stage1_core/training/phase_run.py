"""``stage1 train --phase N``: one phase's recipe run from the command line, without Dagster.

The same library steps the Dagster assets run (:mod:`stage1_core.pipeline`), in the same order,
over an artifacts root (the run's ``output_dir``): dataset index, splits, the phase's backbone,
cached features, then the phase's training, predictions, exit policy on val_calib, evaluation on
val_test, the gate criteria (:mod:`stage1_core.acceptance`) and, only when the gate passed, the
deploy bundle. So the artifacts are those of the Dagster job and a later Dagster run (or
``stage1 summary``) on that root reads them.

Only phases whose training runs on cached features (``train_mode == "cached"``: 1, 2, 3, 6) run
here; phases that adapt the backbone (4, 5) are refused with the Dagster job to run instead. A
phase whose prerequisite phases have not passed their gates in that root is refused by the rule
of the Dagster guard (:func:`stage1_core.phase_state.prerequisite_failures`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stage1_core import pipeline
from stage1_core.config import Stage1ProConfig
from stage1_core.phases import PhaseRecipe, get_recipe, phase_job_name
from stage1_core.phase_state import root_prerequisite_failures

logger = logging.getLogger(__name__)

#: The steps that make a phase's cached features, in order (all that ``--mode extract_features`` runs).
FEATURE_STEPS = ("dataset_index", "splits", "backbone", "cached_features")
#: The steps that train and certify a phase on those features, in order.
TRAINING_STEPS = ("checkpoint", "predictions", "exit_policy", "evaluation")


class PhaseRefusedError(ValueError):
    """The phase cannot run from the command line, or not yet (the message says what to do)."""


class GateFailedError(RuntimeError):
    """The phase ran but its gate did not pass, so no bundle was exported."""


def command_line_refusal(recipe: PhaseRecipe) -> str | None:
    """Why ``recipe`` cannot run from the command line (None when it can): a phase that adapts
    the backbone needs the Dagster job (adapter training, merged backbones, multi-process)."""
    if recipe.train_mode == "cached":
        return None
    return (f"{recipe.key} adapts the backbone ({recipe.backbone}); the command line trains only on cached "
            f"features (phases whose train_mode is 'cached'). Run it with Dagster: `make demo PHASE={recipe.key}` "
            f"(the {phase_job_name(recipe.key)} job), then `stage1 train --phase N` for the phases after it "
            f"with the same --output_dir as artifacts root")


def check_can_run(config: Stage1ProConfig, layout: pipeline.Layout) -> PhaseRecipe:
    """The phase's recipe, or PhaseRefusedError: unavailable, adapts the backbone, or a phase it
    builds on has not passed its gate in ``layout``."""
    recipe = get_recipe(config.phase)
    refusal = command_line_refusal(recipe)
    if refusal:
        raise PhaseRefusedError(refusal)
    failures = root_prerequisite_failures(layout, recipe.key)
    if failures:
        raise PhaseRefusedError(
            f"{recipe.key} refused: an earlier phase's gate has not passed in {layout.root}:\n  " + "\n  ".join(failures)
        )
    return recipe


def prepare_features(config: Stage1ProConfig, layout: pipeline.Layout, partition: str) -> dict[str, Any]:
    """Dataset index, splits, the phase's backbone and its cached features (reused when current)."""
    steps = {
        "dataset_index": lambda: pipeline.build_dataset_index(config, layout),
        "splits": lambda: pipeline.build_splits(config, layout),
        "backbone": lambda: pipeline.prepare_backbone(config, layout, partition),
        "cached_features": lambda: pipeline.cache_features(config, layout, partition),
    }
    return {name: _run(name, partition, steps[name]) for name in FEATURE_STEPS}


def train_and_certify(config: Stage1ProConfig, layout: pipeline.Layout, partition: str,
                      run_id: str = "cli") -> dict[str, Any]:
    """Train, predict, fit the exit policy, evaluate, judge the gate and export the bundle.

    The bundle is exported only when every criterion judged before it passed (as Dagster's
    export guard demands); the bundle's own criteria are judged after it. Raises GateFailedError,
    listing each failing criterion with its message, when the gate did not pass.
    """
    recipe = get_recipe(partition)
    steps = {
        "checkpoint": pipeline.train_phase,
        "predictions": pipeline.predict_splits,
        "exit_policy": pipeline.fit_exit_policy,
        "evaluation": pipeline.evaluate_phase,
    }
    results = {name: _run(name, partition, lambda step=steps[name]: step(config, layout, partition))
               for name in TRAINING_STEPS}
    before = [c.name for c in recipe.criteria if c.asset != "bundle"]
    verdicts = {name: pipeline.evaluate_criterion(name, config, layout, partition) for name in before}
    failed = [v for v in verdicts.values() if not v.passed]
    if failed:
        raise GateFailedError(
            f"{partition}: {len(failed)} of {len(recipe.criteria)} gate criteria failed, so no bundle was exported "
            f"(artifacts in {layout.root}):\n  " + "\n  ".join(v.describe() for v in failed)
        )
    bundle = _run("bundle", partition, lambda: pipeline.export_phase_bundle(config, layout, partition, run_id=run_id))
    for criterion in recipe.criteria:
        if criterion.asset == "bundle":
            verdicts[criterion.name] = pipeline.evaluate_criterion(criterion.name, config, layout, partition)
    failed = [v for v in verdicts.values() if not v.passed]
    if failed:
        raise GateFailedError(f"{partition}: the exported bundle failed its checks:\n  "
                              + "\n  ".join(v.describe() for v in failed))
    for verdict in verdicts.values():
        logger.info("%s", verdict.describe())
    return {
        "phase": partition,
        "artifacts_root": str(layout.root),
        "steps": {name: result.metadata.get("lineage_id") for name, result in results.items()},
        "gate": {name: {"passed": v.passed, "message": v.message} for name, v in verdicts.items()},
        "bundle_dir": str(pipeline.bundle_dir(layout, partition)),
        "bundle_id": bundle.metadata.get("bundle_id"),
    }


def run_phase(config: Stage1ProConfig, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """``stage1 train --phase N``: the phase's recipe on the artifacts root ``output_dir``.

    ``mode: extract_features`` stops after the cached features; ``train_cached`` and ``train``
    run the whole phase (the recipe trains on cached features, as its Dagster job does).
    The steps pick their device as under Dagster (CUDA when available), so ``device`` is refused.
    """
    del progress  # each step shows its own progress, as under Dagster
    if device is not None:
        raise PhaseRefusedError(f"--device {device}: the phase steps pick their device as under Dagster (CUDA when "
                                f"available); leave --device out (CUDA_VISIBLE_DEVICES= keeps them on the CPU)")
    layout = pipeline.Layout(Path(config.output_dir))
    recipe = check_can_run(config, layout)
    if config.mode == "train":
        logger.info("%s trains on cached features (its recipe's train_mode); augmentation applies to no step here",
                    recipe.key)
    features = prepare_features(config, layout, recipe.key)
    if config.mode == "extract_features":
        return {"phase": recipe.key, "artifacts_root": str(layout.root),
                "steps": {name: result.metadata.get("lineage_id") for name, result in features.items()}}
    return train_and_certify(config, layout, recipe.key)


def _run(name: str, partition: str, step: Any) -> Any:
    logger.info("%s[%s] ...", name, partition)
    result = step()
    logger.info("%s[%s] done", name, partition)
    return result
