"""Phase-partitioned policy assets: the exit policy (val_calib) and its evaluation (val_test)."""

import dagster as dg

from stage1_assets.assets._common import as_failure
from stage1_assets.assets.model import _result, predictions
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


@dg.asset(group_name="policy", partitions_def=phases, deps=[predictions], kinds={"json"})
def exit_policy(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """The certified exit policy file (thresholds.json in phases 1-2), fit on val_calib only."""
    with as_failure():
        return _result(pipeline.fit_exit_policy(stage1.load_config(), stage1.layout(), context.partition_key))


@dg.asset(group_name="policy", partitions_def=phases, deps=[exit_policy], kinds={"csv"})
def evaluation(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """metrics.csv and figures on val_test only, with bootstrap and Clopper-Pearson intervals."""
    with as_failure():
        return _result(pipeline.evaluate_phase(stage1.load_config(), stage1.layout(), context.partition_key))
