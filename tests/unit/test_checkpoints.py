"""Checkpoints: baseline keys plus resume state, weights_only loading, clear errors."""

from __future__ import annotations

import pytest
import torch

from stage1_core.model.head import HeadStateError
from stage1_core.training.checkpoints import (
    BASELINE_KEYS,
    EXTRA_KEYS,
    CheckpointError,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    save_state_dict,
)
from stage1_core.training.trainer import train_head
from tests.unit.test_trainer import make_config, make_split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    config = make_config(epochs=2)
    result = train_head(config, make_split(64, 0, "t"), make_split(32, 1, "v"), out, progress=False)
    return config, result


def test_full_checkpoint_has_baseline_and_resume_keys(trained):
    config, result = trained
    raw = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    for key in (*BASELINE_KEYS, *EXTRA_KEYS, "ema_state_dict", "ema_num_updates", "best_epoch"):
        assert key in raw, key
    assert raw["epoch"] == 1 and raw["global_step"] == result.global_step
    assert raw["best_acc"] == pytest.approx(100 * result.best_val_accuracy)
    assert raw["config"] == config.to_json_dict()
    assert set(raw["rng_states"]) >= {"python", "numpy", "torch", "generators"}
    assert isinstance(raw["rng_states"]["numpy"]["keys"], list)
    assert list(raw["model_state_dict"]) == ["input_mean", "input_std", "trunk.0.weight", "trunk.0.bias", "cls.weight",
                                             "cls.bias"]
    # The EMA averages the parameters; the standardisation buffers are fixed.
    assert set(raw["ema_state_dict"]) == set(raw["model_state_dict"]) - {"input_mean", "input_std"}
    assert len(raw["history"]) == 2
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 1


def test_missing_empty_and_truncated_files_name_the_file(tmp_path, trained):
    _, result = trained
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=r"nope\.pth: file not found"):
        load_checkpoint(missing)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: file is empty"):
        load_checkpoint(empty)
    data = result.last_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: unreadable or truncated"):
        load_checkpoint(truncated)


def test_missing_keys_are_listed(tmp_path, trained):
    _, result = trained
    full = load_checkpoint(result.last_checkpoint)
    partial = {k: v for k, v in full.items() if k not in ("history", "rng_states")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match=r"partial\.pth: checkpoint lacks keys \['rng_states', 'history'\]"):
        load_checkpoint(path)
    old_style = {k: full[k] for k in BASELINE_KEYS}
    torch.save(old_style, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="checkpoint of the old script"):
        load_checkpoint(tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="refusing to write"):
        save_checkpoint(tmp_path / "x.pth", old_style)


class Payload:
    """An arbitrary class: unpickling it would run code of the file's choosing."""


def test_objects_other_than_tensors_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load"):
        load_checkpoint(path)


def test_wrong_shaped_checkpoint_names_file_and_keys(tmp_path, trained):
    config, result = trained
    other_hidden = make_split(64, 0, "t")
    wide = type(other_hidden)(torch.randn(64, 24), other_hidden.labels, other_hidden.sample_ids, "t")
    val = type(other_hidden)(torch.randn(32, 24), torch.arange(32) % 2, None, "v")
    with pytest.raises(HeadStateError, match=r"checkpoint_last\.pth: .*trunk\.0\.weight: file \(768, 16\) vs head \(768, 24\)"):
        train_head(config, wide, val, tmp_path, progress=False, resume_checkpoint=result.last_checkpoint)


def test_plain_state_dict_files(tmp_path, trained):
    _, result = trained
    best = load_state_dict_file(result.best_checkpoint)
    assert all(isinstance(v, torch.Tensor) for v in best.values())
    from_full = load_state_dict_file(result.last_checkpoint)
    assert set(from_full) == set(best)
    path = save_state_dict(tmp_path / "head.pth", best)
    assert all(torch.equal(a, b) for a, b in zip(load_state_dict_file(path).values(), best.values()))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        load_state_dict_file(tmp_path / "list.pth")
