"""The Dagster code location: ``dagster asset materialize -m stage1_assets.definitions ...``."""

from typing import Any

import dagster as dg

from stage1_assets.assets.bundle import bundle
from stage1_assets.assets.data import dataset_index, splits
from stage1_assets.assets.model import backbone, cached_features, checkpoint, predictions
from stage1_assets.assets.policy import evaluation, exit_policy
from stage1_assets.checks.phase_gates import CHECKS_BY_PHASE, phase_gate_checks
from stage1_assets.executor import stage1_executor
from stage1_assets.partitions import phase_job_name, phase_line
from stage1_assets.resources import default_resource
from stage1_assets.skips import skip_jobs
from stage1_core.phases import PHASES


def phase_job(number: int) -> Any:
    """Every asset up to the bundle, with only the gate checks of this phase (no 'not applicable' ones)."""
    recipe = PHASES[number]
    selection = dg.AssetSelection.assets(bundle).upstream().without_checks() | dg.AssetSelection.checks(
        *CHECKS_BY_PHASE[recipe.key]
    )
    return dg.define_asset_job(
        name=phase_job_name(recipe.key),
        selection=selection,
        description=(
            f"Run {recipe.key} end to end: data, features, training, exit policy, evaluation, its gate checks "
            f"and the bundle. Launch it for partition {recipe.key}.\n\n{phase_line(number)}"
        ),
        tags={"stage1/phase": recipe.key},
    )


phase_jobs = [phase_job(number) for number, recipe in PHASES.items() if recipe.available]

defs = dg.Definitions(
    assets=[dataset_index, splits, backbone, cached_features, checkpoint, predictions, exit_policy, evaluation, bundle],
    asset_checks=phase_gate_checks,
    jobs=[*phase_jobs, *skip_jobs],
    resources={"stage1": default_resource()},
    executor=stage1_executor,
)
