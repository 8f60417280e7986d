"""world_size 2 end to end: the cached_features asset runs torchrun through Dagster Pipes (gloo, 2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from stage1_assets.assets.data import dataset_index, splits
from stage1_assets.assets.model import backbone, cached_features, checkpoint
from stage1_assets.resources import Stage1Resource
from stage1_core.lineage import read_record

pytestmark = pytest.mark.slow

CONFIG = {"data_source": "synthetic", "model_path": "builtin:tiny-dinov3", "synthetic_n_train": 24,
          "synthetic_n_val": 36, "seed": 3, "max_batch_size": 8, "fallback_batch_size": 8, "num_workers": 0,
          # The challenge views are extracted by the same sharded collective as the clean splits.
          "deploy_pipeline": "streetvision", "train_views": 1}


def _materialize(tmp: Path, world_size: int, instance: dg.DagsterInstance, data: bool,
                 assets: tuple = (backbone, cached_features)) -> dg.ExecuteInJobResult:
    config = tmp / f"config{world_size}.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "world_size": world_size}))
    resource = Stage1Resource(config_path=str(config), artifacts_root=str(tmp / "artifacts"))
    if data:
        dg.materialize([dataset_index, splits], instance=instance, resources={"stage1": resource})
    return dg.materialize(list(assets), partition_key="phase1", instance=instance, resources={"stage1": resource})


def test_world_size_two_runs_torchrun_through_pipes_and_one_process_then_reuses_it(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranks of one thread each in the child
    try:
        with dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
            two = _materialize(tmp_path, 2, instance, data=True, assets=(backbone, cached_features, checkpoint))
            record2 = read_record(tmp_path / "artifacts" / "cached_features" / "phase1", "cached_features", "phase1")
            one = _materialize(tmp_path, 1, instance, data=False)
            logs = [entry.user_message for entry in instance.all_logs(two.run_id)]
    finally:
        torch.set_num_threads(threads)
    assert two.success and one.success
    mat2 = two.asset_materializations_for_node("cached_features")[0]
    mat1 = one.asset_materializations_for_node("cached_features")[0]
    assert mat2.metadata["world_size"].value == 2 and mat2.metadata["threads_per_rank"].value == 1
    assert set(mat1.metadata) <= set(mat2.metadata), "the distributed run reports every figure the in-process one does"
    assert mat2.metadata["forward_passes"].value > 0 and mat2.metadata["reused"].value is False
    assert mat2.metadata["deploy_forward_passes"].value > 0, "both ranks extracted the challenge views"
    assert mat2.tags.get("dagster/data_version") == record2.id
    assert record2.extra["environment"]["world_size"] == 2
    # world_size is environment: the one-process run finds the same store, the same id, nothing to extract.
    record1 = read_record(tmp_path / "artifacts" / "cached_features" / "phase1", "cached_features", "phase1")
    assert mat1.metadata["reused"].value is True and mat1.metadata["forward_passes"].value == 0
    assert mat1.metadata["deploy_forward_passes"].value == 0
    assert record1.id == record2.id and mat1.metadata["key"].value == mat2.metadata["key"].value
    assert record1.extra["environment"]["world_size"] == 1
    # The head trained by DDP on the 2 ranks: rank 0 wrote the checkpoint, its summary and its record.
    trained = two.asset_materializations_for_node("checkpoint")[0]
    summary = json.loads((tmp_path / "artifacts" / "checkpoint" / "phase1" / "training.json").read_text())
    assert summary["environment"]["world_size"] == 2 and trained.metadata["world_size"].value == 2
    assert trained.metadata["best_epoch"].value >= 1 and "figure: training curves" in trained.metadata
    assert (tmp_path / "artifacts" / "checkpoint" / "phase1" / summary["best_checkpoint"]).is_file()
    assert any("torchrun with 2 ranks x 1 thread(s)" in m for m in logs), "the launch is logged in the run"
    assert any("cached_features[phase1] on 2 rank(s)" in m for m in logs), "rank 0 logs to the run through Pipes"
