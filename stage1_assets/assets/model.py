"""Phase-partitioned model assets: backbone, cached features, checkpoint, predictions."""

import dagster as dg

from stage1_assets.assets._common import as_failure, figure_markdown, table, to_metadata
from stage1_assets.assets.data import splits
from stage1_assets.guards import require_previous_phase_gates
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


def _result(result: "pipeline.StepResult") -> dg.MaterializeResult:
    metadata = to_metadata(result.metadata)
    for name, rows in result.tables.items():
        metadata[name] = table(rows)
    if result.figures:
        metadata["figures"] = figure_markdown(result.figures)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(group_name="model", partitions_def=phases, deps=[splits], kinds={"pytorch"})
def backbone(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Which backbone weights this phase uses (builtin or a local DINOv3 directory) and their fingerprint."""
    require_previous_phase_gates(context.instance, context.partition_key)
    with as_failure():
        return _result(pipeline.prepare_backbone(stage1.load_config(), stage1.layout(), context.partition_key))


@dg.asset(group_name="model", partitions_def=phases, deps=[backbone], pool="gpu", kinds={"pytorch"})
def cached_features(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """CLS features of every split, content-addressed: phases sharing a backbone reuse them."""
    require_previous_phase_gates(context.instance, context.partition_key)
    with as_failure():
        return _result(pipeline.cache_features(stage1.load_config(), stage1.layout(), context.partition_key))


@dg.asset(group_name="model", partitions_def=phases, deps=[cached_features], pool="gpu", kinds={"pytorch"})
def checkpoint(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """model_best.pth chosen on val_select by the phase's selection metric, plus the training log."""
    require_previous_phase_gates(context.instance, context.partition_key)
    with as_failure():
        return _result(pipeline.train_phase(stage1.load_config(), stage1.layout(), context.partition_key))


@dg.asset(group_name="model", partitions_def=phases, deps=[checkpoint], kinds={"pytorch"})
def predictions(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Logits of the best checkpoint (never the last epoch's) on val_select, val_calib and val_test."""
    with as_failure():
        return _result(pipeline.predict_splits(stage1.load_config(), stage1.layout(), context.partition_key))
