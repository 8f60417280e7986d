"""The Dagster code location: ``dagster asset materialize -m stage1_assets.definitions ...``."""

import dagster as dg

from stage1_assets.assets.bundle import bundle
from stage1_assets.assets.data import dataset_index, splits
from stage1_assets.assets.model import backbone, cached_features, checkpoint, predictions
from stage1_assets.assets.policy import evaluation, exit_policy
from stage1_assets.checks.phase_gates import phase_gate_checks
from stage1_assets.resources import default_resource

#: One process per step, started from a forkserver that has already imported torch, transformers
#: and this code location, so a step or check starts in well under a second instead of paying
#: the imports again (about 8 s each on 2 cores).
executor = dg.multiprocess_executor.configured(
    {"start_method": {"forkserver": {"preload_modules": ["stage1_assets.definitions"]}}}
)

defs = dg.Definitions(
    assets=[dataset_index, splits, backbone, cached_features, checkpoint, predictions, exit_policy, evaluation, bundle],
    asset_checks=phase_gate_checks,
    resources={"stage1": default_resource()},
    executor=executor,
)
