"""The deploy bundle: exported only after the phase gate passed, verified before it is published."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, HEADLINE_KEYS, run_step, table
from stage1_assets.assets.model import checkpoint
from stage1_assets.assets.policy import evaluation, exit_policy
from stage1_assets.guards import require_gate_for_export
from stage1_assets.partitions import GROUPS, PHASES_TEXT, phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline
from stage1_core.steps.summary import format_cell, phase_status, summary_table


#: The figures a person compares across phases, as rows of ``phase_figures`` (summary column -> label).
FIGURE_ROWS = {
    "calib_coverage": "certified coverage (val_calib)",
    "test_coverage": "coverage (val_test)",
    "test_fnr": "FNR on exits (val_test)",
    "test_fnr_bound": "FNR bound, Clopper-Pearson (val_test)",
    "accuracy": "accuracy (val_test)",
    "mcc": "MCC (val_test)",
}


def phase_overview(stage1: Stage1Resource, partition: str) -> dict[str, dg.TableMetadataValue]:
    """``phase_overview`` and ``phase_figures``: the rows of `stage1 summary --all`, split to fit the page.

    ``phase_overview`` answers "which phases passed their gates, and which bundle is current" (one
    row per phase: state, bundle id, why); ``phase_figures`` puts the headline figures of every
    phase with a current bundle side by side (one column per phase). The bundle's own check
    (bundle_verified) runs after this asset, so while it is the only criterion of ``partition``
    without a verdict the row says the gate passed up to it.
    """
    config, layout = stage1.load_config(), stage1.layout()
    rows = summary_table(config, layout)
    if phase_status(config, layout, partition)["missing"] == ["bundle_verified"]:
        for row in rows:
            if row["phase"] == partition:
                row["state"] = "passed"
                row["detail"] = "gate passed up to the bundle; bundle_verified runs next"
    overview = table([{"phase": r["phase"], "state": r["state"], "bundle": r["bundle_id"] or "-",
                       "detail": r["detail"]} for r in rows])
    shipped = [r for r in rows if r["bundle_id"]]
    figures = table([{"figure": label, **{r["phase"]: format_cell(column, r[column]) for r in shipped}}
                     for column, label in FIGURE_ROWS.items()])
    return {"phase_overview": overview, "phase_figures": figures}


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
        "skipped, not available) and which bundle is current; phase_figures puts the headline figures of the "
        "phases side by side. `stage1 summary --all` prints the same rows.\n\n"
        + PHASES_TEXT
    ),
)
def bundle(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    require_gate_for_export(context.instance, context.partition_key)
    result = run_step(context, stage1, "bundle", pipeline.export_phase_bundle, run_id=context.run_id)
    metadata = dict(result.metadata or {})
    headline = {key: metadata.pop(key) for key in HEADLINE_KEYS if key in metadata}
    metadata = {**headline, **phase_overview(stage1, context.partition_key), **metadata}
    return dg.MaterializeResult(metadata=metadata, data_version=result.data_version)
