"""Training under DistributedDataParallel (gloo, 2 CPU processes): equals one process, resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stage1_core.distributed.ddp import RANK_RNG_KEY, RankSlicedBatchSampler
from stage1_core.training.checkpoints import load_checkpoint
from tests.unit.distributed_worker import train_run
from tests.unit.test_backbone import save_small_backbone
from tests.unit.test_distributed_extract import torchrun


def test_rank_slices_of_the_global_batches_add_up_to_what_one_process_draws():
    one = list(RankSlicedBatchSampler(21, 6, torch.Generator().manual_seed(5), world=1, index=0))
    parts = [list(RankSlicedBatchSampler(21, 6, torch.Generator().manual_seed(5), world=2, index=r)) for r in range(2)]
    assert len(one) == len(parts[0]) == len(parts[1]) == 3  # drop_last: 21 // 6
    assert [a + b for a, b in zip(*parts)] == one
    assert all(len(batch) == 3 for part in parts for batch in part)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One torchrun job of 2 ranks (see ``distributed_worker.train``) and the one-process reference."""
    root = tmp_path_factory.mktemp("ddp")
    backbone = save_small_backbone(root / "bb")
    done = torchrun(2, "train", {"backbone": str(backbone), "out": str(root / "two")}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    train_run(str(backbone), root / "one")
    return root


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(directory / "checkpoint_last.pth")
    return {**{f"head.{k}": v for k, v in checkpoint["model_state_dict"].items()},
            **{f"backbone.{k}": v for k, v in checkpoint["backbone_trainable_state_dict"].items()}}


def test_two_ranks_with_half_batches_end_with_the_weights_of_one_process(runs):
    one, two = _weights(runs / "one"), _weights(runs / "two" / "plain")
    assert set(one) == set(two) and any(k.startswith("backbone.") for k in one)
    start = load_checkpoint(runs / "one" / "checkpoint_last.pth")
    assert start["global_step"] == 2 * 2  # 4 batches of 8 per epoch, accumulation 2, 2 epochs
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k), "the adapters must have trained"
    h1 = [round(r["train_loss"], 5) for r in start["history"]]
    h2 = [round(r["train_loss"], 5) for r in load_checkpoint(runs / "two" / "plain" / "checkpoint_last.pth")["history"]]
    assert h1 == h2, "the logged training loss is the mean over every rank's batches"


def test_stop_and_resume_on_two_ranks_equals_the_uninterrupted_run(runs):
    full, resumed = runs / "two" / "noisy_full", runs / "two" / "noisy_resumed"
    checkpoint = load_checkpoint(resumed / "checkpoint_last.pth")
    assert len(checkpoint[RANK_RNG_KEY]) == 2, "every rank's RNG states are saved"
    a, b = _weights(full), _weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after stop + resume"
    assert not list((runs / "two").rglob("*.tmp*"))
