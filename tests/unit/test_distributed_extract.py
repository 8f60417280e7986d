"""Sharded feature extraction under torchrun (gloo, 2 CPU processes): identical bytes, crash safety, reuse."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stage1_core.distributed.extract import SHARD_DIR, shard_rows
from stage1_core.features import MANIFEST_NAME, extract_split_features, read_manifest
from stage1_core.model.backbone import DINOv3Backbone
from tests.unit.distributed_worker import datasets
from tests.unit.test_backbone import save_small_backbone

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, scenario: str, args: dict, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``tests.unit.distributed_worker`` on ``nproc`` ranks with gloo; returns the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tests.unit.distributed_worker", scenario, json.dumps(args)]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    return save_small_backbone(tmp_path_factory.mktemp("bb"))


def test_shards_are_whole_batches_covering_every_row_once():
    for rows in (0, 1, 7, 8, 22):
        for world in (1, 2, 3):
            parts = [shard_rows(rows, 4, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert all(start % 4 == 0 or start == stop == rows for start, stop in parts)


def test_two_ranks_write_the_same_bytes_as_one_process_and_a_rerun_extracts_nothing(tmp_path, backbone_dir):
    reference = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = extract_split_features(DINOv3Backbone.load(backbone_dir), datasets(), reference, "test-transform",
                                     batch_size=4, device="cpu", progress=False, num_workers=0)
    finally:
        torch.set_num_threads(threads)
    shared = tmp_path / "two"
    done = torchrun(2, "extract", {"backbone": str(backbone_dir), "out": str(shared), "repeat": 2})
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "val"):
        for kind in ("features", "labels"):
            name = f"{split}_{kind}.pt"
            assert sha(shared / name) == sha(reference / name), f"{name} differs between 1 process and 2 ranks"
    two = read_manifest(shared)
    assert two.key == one.key and two.splits == one.splits
    assert not (shared / SHARD_DIR).exists(), "shards must be removed once merged"
    passes = [json.loads((shared / f"passes.rank{r}.json").read_text()) for r in range(2)]
    # 22 and 9 rows in batches of 4, summed over the ranks; the second call of the same job reuses the store.
    assert passes == [[one.forward_passes, 0]] * 2 == [[6 + 3, 0]] * 2


def test_a_rank_killed_mid_run_leaves_no_manifest_and_the_rerun_completes(tmp_path, backbone_dir):
    out = tmp_path / "store"
    # rank 1 holds train rows 12..21; it dies on row 16, after its first batch, so nothing is merged.
    crashed = torchrun(2, "extract", {"backbone": str(backbone_dir), "out": str(out)},
                       env={"STAGE1_TEST_KILL": "1:16"})
    assert crashed.returncode != 0
    assert not (out / MANIFEST_NAME).exists(), "a crashed job must not leave a manifest"
    assert not (out / "train_features.pt").exists() and not (out / "val_features.pt").exists()
    assert not list(out.rglob("*.tmp*")), "no half-written file may remain"
    survivors = sorted(p.name for p in (out / SHARD_DIR).iterdir())
    # rank 0 holds train rows 0..11 and val rows 0..7; whatever it finished survives, nothing of rank 1 does.
    assert survivors and all(name.split(".")[2] in ("0-12", "0-8") for name in survivors), survivors
    reused = sum(3 if name.startswith("train.") else 2 for name in survivors)

    rerun = torchrun(2, "extract", {"backbone": str(backbone_dir), "out": str(out)})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = read_manifest(out)
    assert sorted(manifest.splits) == ["train", "val"]
    # The surviving shards are reused; every other batch of the 6 + 3 runs once.
    assert json.loads((out / "passes.rank0.json").read_text()) == [6 + 3 - reused]
    assert not (out / SHARD_DIR).exists()
    reference = extract_split_features(DINOv3Backbone.load(backbone_dir), datasets(), tmp_path / "ref",
                                       "test-transform", batch_size=4, device="cpu", progress=False, num_workers=0)
    for split in ("train", "val"):
        torch.testing.assert_close(torch.load(out / f"{split}_features.pt", weights_only=True),
                                   torch.load(reference.directory / f"{split}_features.pt", weights_only=True),
                                   rtol=1e-5, atol=1e-5)


def test_one_entry_point_extracts_alone_and_the_single_process_path_refuses_a_rank(tmp_path, backbone_dir,
                                                                                  monkeypatch):
    """extract_features is the single-process extraction outside a job; inside one (a rank of
    torchrun) the single-process function refuses instead of letting every rank write the store."""
    from stage1_core.distributed import env
    from stage1_core.distributed.extract import extract_features
    from stage1_core.features import FeatureCacheError

    backbone = DINOv3Backbone.load(backbone_dir)
    alone = extract_features(backbone, datasets(), tmp_path / "alone", "test-transform", batch_size=4, device="cpu",
                             progress=False, num_workers=0)
    direct = extract_split_features(backbone, datasets(), tmp_path / "direct", "test-transform", batch_size=4,
                                    device="cpu", progress=False, num_workers=0)
    assert alone.forward_passes == direct.forward_passes > 0
    assert read_manifest(tmp_path / "alone").splits.keys() == read_manifest(tmp_path / "direct").splits.keys()
    monkeypatch.setattr(env, "active", lambda: True)
    with pytest.raises(FeatureCacheError, match="distributed.extract.extract_features"):
        extract_split_features(backbone, datasets(), tmp_path / "rank", "test-transform", batch_size=4, device="cpu",
                               progress=False, num_workers=0)
