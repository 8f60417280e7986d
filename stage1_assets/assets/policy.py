"""Phase-partitioned policy assets: the exit policy (val_calib) and its evaluation (val_test)."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, constants_metadata, load_default_config, run_step
from stage1_assets.assets.model import predictions
from stage1_assets.partitions import GROUPS, phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline

#: The promise and settings of the configured run (target FNR, delta, bootstrap, deploy prior).
_CONSTANTS = constants_metadata(load_default_config())


@dg.asset(group_name=GROUPS["certify"], partitions_def=phases, deps=[predictions], kinds={"json"},
          code_version=CODE_VERSION,
          metadata=_CONSTANTS)
def exit_policy(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """The certified exit policy, fit on val_calib only: the exit threshold whose FNR on exits is bounded.

    Writes thresholds.json (softmax), gateparams.json (gate) or scrcparams.json (SCRC). The
    seed_grid table lists every candidate threshold tried. Gate check here: the thresholds are
    schema-valid and certified.
    """
    return run_step(context, stage1, "exit_policy", pipeline.fit_exit_policy)


@dg.asset(group_name=GROUPS["certify"], partitions_def=phases, deps=[exit_policy], kinds={"csv"},
          code_version=CODE_VERSION,
          metadata=_CONSTANTS)
def evaluation(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """The deployed decisions judged on val_test only: coverage, FNR on exits with its bound, accuracy, MCC.

    The metrics table has bootstrap intervals for every metric and the Clopper-Pearson bound of
    FNR on exits; figures show risk against coverage, reliability and the threshold sweep. Its
    gate checks (Checks tab) decide whether this phase may export a bundle.
    """
    return run_step(context, stage1, "evaluation", pipeline.evaluate_phase)
