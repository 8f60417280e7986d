"""Phase-partitioned policy assets: the exit policy (val_calib) and its evaluation (val_test)."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step
from stage1_assets.assets.model import predictions
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


@dg.asset(group_name="policy", partitions_def=phases, deps=[predictions], kinds={"json"}, code_version=CODE_VERSION)
def exit_policy(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """The certified exit policy file (thresholds.json, gateparams.json or scrcparams.json), fit on val_calib only."""
    return run_step(context, stage1, "exit_policy", pipeline.fit_exit_policy)


@dg.asset(group_name="policy", partitions_def=phases, deps=[exit_policy], kinds={"csv"}, code_version=CODE_VERSION)
def evaluation(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """metrics.csv and figures on val_test only, with bootstrap and Clopper-Pearson intervals."""
    return run_step(context, stage1, "evaluation", pipeline.evaluate_phase)
