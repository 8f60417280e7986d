"""Phase-partitioned model assets: backbone, cached features, checkpoint, predictions."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step
from stage1_assets.assets.data import splits
from stage1_assets.guards import require_previous_phase_gates
from stage1_assets.partitions import GROUPS, PHASES_TEXT, phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline

_WAITS = (
    "Refused until the previous phase passed its gate: phase N starts only when every gate check "
    "of phase N-1 passed on its current materialisations."
)


@dg.asset(group_name=GROUPS["features"], partitions_def=phases, deps=[splits], pool="gpu", kinds={"pytorch"},
          code_version=CODE_VERSION,
          description="Which backbone weights this phase uses (builtin or a local DINOv3 directory) and their "
                      f"fingerprint.\n\n{_WAITS}\n\n{PHASES_TEXT}")
def backbone(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    require_previous_phase_gates(context.instance, context.partition_key, stage1.layout())
    return run_step(context, stage1, "backbone", pipeline.prepare_backbone)


@dg.asset(group_name=GROUPS["features"], partitions_def=phases, deps=[backbone], pool="gpu", kinds={"pytorch"},
          code_version=CODE_VERSION)
def cached_features(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """CLS features of every split, keyed by backbone, transform and image content, so later phases reuse them.

    Refused until the previous phase passed its gate.
    """
    require_previous_phase_gates(context.instance, context.partition_key, stage1.layout())
    return run_step(context, stage1, "cached_features", pipeline.cache_features)


@dg.asset(group_name=GROUPS["training"], partitions_def=phases, deps=[cached_features], pool="gpu", kinds={"pytorch"},
          code_version=CODE_VERSION)
def checkpoint(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """The phase's head trained on train, the best epoch chosen on val_select (model_best.pth and the training log).

    Phase 1 selects by accuracy, later phases by AUGRC. Refused until the previous phase passed
    its gate. Gate checks here: training completed, accuracy against the baseline, and that the
    chosen checkpoint is the best epoch.
    """
    require_previous_phase_gates(context.instance, context.partition_key, stage1.layout())
    return run_step(context, stage1, "checkpoint", pipeline.train_phase)


@dg.asset(group_name=GROUPS["training"], partitions_def=phases, deps=[checkpoint], kinds={"pytorch"},
          code_version=CODE_VERSION)
def predictions(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Logits (and gate logits) of the best checkpoint, never the last epoch's, on val_select, val_calib and val_test."""
    return run_step(context, stage1, "predictions", pipeline.predict_splits)
