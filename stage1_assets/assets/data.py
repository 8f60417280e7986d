"""Unpartitioned data assets shared by every phase: the validated sample index and the splits."""

import dagster as dg

from stage1_assets.assets._common import CODE_VERSION, run_step
from stage1_assets.partitions import GROUPS
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline


@dg.asset(group_name=GROUPS["data"], kinds={"python", "csv"}, code_version=CODE_VERSION)
def dataset_index(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """Validated table of every sample: id, path, label, source, split of origin and image sha256.

    Shared by all phases. With data_source synthetic the embedded synthetic data set is generated
    first. Every labels problem is reported at once, with its file and line.
    """
    return run_step(context, stage1, "dataset_index", pipeline.build_dataset_index)


@dg.asset(group_name=GROUPS["data"], deps=[dataset_index], kinds={"python", "json"}, code_version=CODE_VERSION)
def splits(context: dg.AssetExecutionContext, stage1: Stage1Resource) -> dg.MaterializeResult:
    """The four splits (train, val_select, val_calib, val_test), drawn once with split_seed and shared by all phases.

    train fits weights, val_select picks the checkpoint, val_calib fits the exit policy and
    val_test is only used to evaluate.
    """
    return run_step(context, stage1, "splits", pipeline.build_splits)
