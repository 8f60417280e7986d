"""Phase-partitioned model assets: backbone, cached features, checkpoint, predictions."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step
from stage1_assets.assets.data import splits
from stage1_assets.guards import require_previous_phase_gates
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


@dg.asset(group_name="model", partitions_def=phases, deps=[splits], kinds={"pytorch"}, code_version=CODE_VERSION)
def backbone(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Which backbone weights this phase uses (builtin or a local DINOv3 directory) and their fingerprint.

    Waits for the previous phase's gate.
    """
    require_previous_phase_gates(context.instance, context.partition_key)
    return run_step(context, stage1, "backbone", pipeline.prepare_backbone)


@dg.asset(group_name="model", partitions_def=phases, deps=[backbone], pool="gpu", kinds={"pytorch"},
          code_version=CODE_VERSION)
def cached_features(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """CLS features of every split, keyed by backbone, transform and image content: reused across phases."""
    require_previous_phase_gates(context.instance, context.partition_key)
    return run_step(context, stage1, "cached_features", pipeline.cache_features)


@dg.asset(group_name="model", partitions_def=phases, deps=[cached_features], pool="gpu", kinds={"pytorch"},
          code_version=CODE_VERSION)
def checkpoint(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """model_best.pth chosen on val_select by the phase's selection metric, plus the training log."""
    require_previous_phase_gates(context.instance, context.partition_key)
    return run_step(context, stage1, "checkpoint", pipeline.train_phase)


@dg.asset(group_name="model", partitions_def=phases, deps=[checkpoint], kinds={"pytorch"}, code_version=CODE_VERSION)
def predictions(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Logits (and gate logits) of the best checkpoint, never the last epoch's, on the three val splits."""
    return run_step(context, stage1, "predictions", pipeline.predict_splits)
