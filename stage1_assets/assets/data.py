"""Unpartitioned data assets shared by every phase: the validated sample index and the splits."""

import dagster as dg

from stage1_assets.assets._common import as_failure, table, to_metadata
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


@dg.asset(group_name="data", kinds={"python", "csv"})
def dataset_index(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Validated table of every sample: id, path, label, source, split of origin.

    With ``data_source: synthetic`` the embedded synthetic data set is generated first.
    """
    with as_failure():
        result = pipeline.build_dataset_index(stage1.load_config(), stage1.layout())
    return dg.MaterializeResult(
        metadata={**to_metadata(result.metadata), "per_source": table(result.tables["per_source"])}
    )


@dg.asset(group_name="data", deps=[dataset_index], kinds={"python", "json"})
def splits(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """splits.json: train / val_select / val_calib / val_test, shared by all phases."""
    with as_failure():
        result = pipeline.build_splits(stage1.load_config(), stage1.layout())
    return dg.MaterializeResult(
        metadata={**to_metadata(result.metadata), "per_split": table(result.tables["per_split"])}
    )
