"""Training under DistributedDataParallel (gloo, 2 CPU processes): equals one process, resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stage1_core.distributed import env
from stage1_core.distributed.ddp import RANK_RNG_KEY, RankSlicedBatchSampler, check_global_batch, rng_states_for_this_rank
from stage1_core.training.checkpoints import load_checkpoint
from tests.unit.distributed_worker import cached_run, explora_run, explora_weights, train_run
from tests.unit.test_backbone import save_small_backbone
from tests.unit.test_distributed_extract import torchrun


def test_rank_slices_of_the_global_batches_add_up_to_what_one_process_draws():
    one = list(RankSlicedBatchSampler(21, 6, torch.Generator().manual_seed(5), world=1, index=0))
    parts = [list(RankSlicedBatchSampler(21, 6, torch.Generator().manual_seed(5), world=2, index=r)) for r in range(2)]
    assert len(one) == len(parts[0]) == len(parts[1]) == 3  # drop_last: 21 // 6
    assert [a + b for a, b in zip(*parts)] == one
    assert all(len(batch) == 3 for part in parts for batch in part)


def test_without_a_process_group_there_is_one_rank_and_resumes_need_the_same_count():
    assert (env.rank(), env.world_size(), env.is_main(), env.active()) == (0, 1, True, False)
    assert env.all_reduce_sum([1.5, 2]) == [1.5, 2] and env.gather_objects("x") == ["x"]
    assert [env.rank_slice(7, 3, r) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert check_global_batch(6) == 6
    assert rng_states_for_this_rank({"rng_states": "mine"}, "ckpt") == "mine"
    with pytest.raises(ValueError, match="written by 2 rank"):
        rng_states_for_this_rank({"rng_states": "r0", RANK_RNG_KEY: ["r0", "r1"]}, "ckpt")


def test_a_last_batch_too_small_for_every_rank_is_skipped_on_every_rank():
    parts = [list(RankSlicedBatchSampler(9, 4, torch.Generator().manual_seed(1), drop_last=False, world=2, index=r))
             for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]  # 4 + 4, the lone 9th sample skipped
    assert len(RankSlicedBatchSampler(9, 4, None, shuffle=False, drop_last=False, world=2, index=0)) == 2
    assert len(RankSlicedBatchSampler(10, 4, None, shuffle=False, drop_last=False, world=2, index=0)) == 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One torchrun job of 2 ranks (see ``distributed_worker.train``) and the one-process reference."""
    root = tmp_path_factory.mktemp("ddp")
    backbone = save_small_backbone(root / "bb")
    # ExPLoRA trains in train mode, where DINOv3 rescales RoPE positions at random: off, like dropout.
    fixed = root / "bb_fixed_rope"
    fixed.mkdir()
    (fixed / "config.json").write_text((backbone / "config.json").read_text().replace('"pos_embed_rescale": 2.0',
                                                                                     '"pos_embed_rescale": null'))
    (fixed / "model.safetensors").symlink_to(backbone / "model.safetensors")
    done = torchrun(2, "train", {"backbone": str(backbone), "explora_backbone": str(fixed), "out": str(root / "two")},
                    timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    train_run(str(backbone), root / "one")
    cached_run(root / "one_cached")
    torch.save(explora_weights(explora_run(str(fixed))), root / "explora_one.pt")
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


def test_head_training_on_cached_features_with_two_ranks_matches_one_process(runs):
    one = load_checkpoint(runs / "one_cached" / "checkpoint_last.pth")
    two = load_checkpoint(runs / "two" / "cached" / "checkpoint_last.pth")
    assert one["global_step"] == two["global_step"] == 2 * 2  # 4 global batches of 8, accumulation 2
    for name, value in one["model_state_dict"].items():
        torch.testing.assert_close(two["model_state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


def test_stop_and_resume_on_two_ranks_equals_the_uninterrupted_run(runs):
    full, resumed = runs / "two" / "noisy_full", runs / "two" / "noisy_resumed"
    checkpoint = load_checkpoint(resumed / "checkpoint_last.pth")
    assert len(checkpoint[RANK_RNG_KEY]) == 2, "every rank's RNG states are saved"
    a, b = _weights(full), _weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after stop + resume"
    assert not list((runs / "two").rglob("*.tmp*"))


def test_explora_on_two_ranks_matches_one_process_and_resumes_exactly(runs):
    one = torch.load(runs / "explora_one.pt", weights_only=True)
    two = torch.load(runs / "two" / "explora_weights.pt", weights_only=True)
    assert set(one) == set(two["full"]) and any("lora_B" in k for k in one)
    for name in one:  # the masked-patch loss is all-reduced as global sum / global count
        a, b = two["full"][name], one[name]
        if name.endswith("qkv.bias"):
            # The attention key bias has no true gradient (softmax ignores a shift shared by all keys):
            # AdamW turns its rounding noise into full steps, so it is compared without its key part.
            dim = a.shape[0] // 3
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    for name in one:
        assert torch.equal(two["resumed"][name], two["full"][name]), f"{name} differs after stop + resume"
