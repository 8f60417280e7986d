"""The deploy bundle: exported only after the phase gate passed, verified before it is published."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step, table
from stage1_assets.assets.data import dataset_index, splits
from stage1_assets.assets.model import backbone, cached_features, checkpoint, predictions
from stage1_assets.assets.policy import evaluation, exit_policy
from stage1_assets.guards import require_gate_for_export
from stage1_assets.partitions import PHASES_TEXT, phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline
from stage1_core.steps.summary import phase_status, summary_table


def phase_overview(stage1: Stage1Resource, partition: str) -> dg.TableMetadataValue:
    """Every phase's gate verdict and current bundle, as `stage1 summary --all` prints them.

    The bundle's own check (bundle_verified) runs after this asset, so ``partition`` reads
    "incomplete" while only that check is missing; it is shown as waiting for it instead.
    """
    config, layout = stage1.load_config(), stage1.layout()
    rows = summary_table(config, layout)
    if phase_status(config, layout, partition)["missing"] == ["bundle_verified"]:
        for row in rows:
            if row["phase"] == partition:
                row["gate"] = "passed, bundle check running"
    return table(rows)


# The bundle reads every upstream artifact (splits, config, backbone reference, head weights,
# policy, metrics, val_test features for verification) and checks their lineage, so all of them
# are direct deps; that also makes `--select +bundle` select the whole pipeline.
@dg.asset(
    group_name="deploy",
    partitions_def=phases,
    deps=[dataset_index, splits, backbone, cached_features, checkpoint, predictions, exit_policy, evaluation],
    kinds={"folder"},
    code_version=CODE_VERSION,
    description=(
        "The deploy bundle of a phase: staged, verified (checksums, lineage, and decisions equal to the "
        "evaluation's on val_test), then published atomically.\n\n"
        "Refused unless every gate check of this phase passed on the current materialisations. Its "
        "phase_overview table says, for every phase, whether the gate passed and which bundle is current "
        "(the same table as `stage1 summary --all`).\n\n" + PHASES_TEXT
    ),
)
def bundle(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    require_gate_for_export(context.instance, context.partition_key)
    result = run_step(context, stage1, "bundle", pipeline.export_phase_bundle, run_id=context.run_id)
    metadata = {**(result.metadata or {}), "phase_overview": phase_overview(stage1, context.partition_key)}
    return dg.MaterializeResult(metadata=metadata, data_version=result.data_version)
