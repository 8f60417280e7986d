"""The deploy bundle: exported only after the phase gate passed, verified before it is published."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step
from stage1_assets.assets.data import dataset_index, splits
from stage1_assets.assets.model import backbone, cached_features, checkpoint, predictions
from stage1_assets.assets.policy import evaluation, exit_policy
from stage1_assets.guards import require_gate_for_export
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


# The bundle reads every upstream artifact (splits, config, backbone reference, head weights,
# policy, metrics, val_test features for verification) and checks their lineage, so all of them
# are direct deps; that also makes `--select +bundle` select the whole pipeline.
@dg.asset(
    group_name="deploy",
    partitions_def=phases,
    deps=[dataset_index, splits, backbone, cached_features, checkpoint, predictions, exit_policy, evaluation],
    kinds={"folder"},
    code_version=CODE_VERSION,
)
def bundle(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Stage, verify (checksums, lineage, decisions equal the evaluation's), then publish the bundle atomically.

    Refused unless this phase's gate checks passed on the current materialisations.
    """
    require_gate_for_export(context.instance, context.partition_key)
    return run_step(context, stage1, "bundle", pipeline.export_phase_bundle, run_id=context.run_id)
