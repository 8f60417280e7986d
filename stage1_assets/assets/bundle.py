"""The deploy bundle: exported only after the phase gate passed, verified before it is published."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step, table
from stage1_assets.assets.model import checkpoint
from stage1_assets.assets.policy import evaluation, exit_policy
from stage1_assets.guards import require_gate_for_export
from stage1_assets.partitions import GROUPS, PHASES_TEXT, phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline
from stage1_core.steps.bundle import BUNDLE_INPUTS
from stage1_core.steps.summary import phase_status, summary_table


def phase_overview(stage1: Stage1Resource, partition: str) -> dg.TableMetadataValue:
    """Every phase's state, headline figures and current bundle, as `stage1 summary --all` prints them.

    The bundle's own check (bundle_verified) runs after this asset, so while it is the only
    criterion of ``partition`` without a verdict the row says the gate passed up to it.
    """
    config, layout = stage1.load_config(), stage1.layout()
    rows = summary_table(config, layout)
    if phase_status(config, layout, partition)["missing"] == ["bundle_verified"]:
        for row in rows:
            if row["phase"] == partition:
                row["state"] = "passed"
                row["detail"] = "every gate criterion before the bundle passed; bundle_verified runs next"
    return table(rows)


# In the graph the bundle depends on what it packages: the head weights (checkpoint), the
# certified policy (exit_policy) and the metrics it must reproduce (evaluation). It also reads and
# lineage-checks the rest of the chain (splits, backbone, features, predictions); the lineage ids
# carry those links, so the graph stays a readable flow. Select `*bundle` (all ancestors) or run the
# phase job to materialise a whole phase.
@dg.asset(
    group_name=GROUPS["deploy"],
    partitions_def=phases,
    deps=[checkpoint, exit_policy, evaluation],
    kinds={"folder"},
    code_version=CODE_VERSION,
    description=(
        "The deploy bundle of a phase: head weights, the certified exit policy, metrics, splits and config, "
        "staged, verified (checksums, lineage, and decisions equal to the evaluation's on val_test), then "
        "published atomically.\n\n"
        "Refused unless every gate check of this phase passed on the current materialisations. Its "
        "phase_overview table says, for every phase, whether its gate passed (state: passed, failed, not run, "
        "skipped, not available) and which bundle is current; `stage1 summary --all` prints the same table.\n\n"
        + PHASES_TEXT
    ),
)
def bundle(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    require_gate_for_export(context.instance, context.partition_key)
    result = run_step(context, stage1, "bundle", pipeline.export_phase_bundle, run_id=context.run_id,
                      reads=(*BUNDLE_INPUTS, "splits", "dataset_index"))
    metadata = {**(result.metadata or {}), "phase_overview": phase_overview(stage1, context.partition_key)}
    return dg.MaterializeResult(metadata=metadata, data_version=result.data_version)
