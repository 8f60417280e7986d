"""The standalone (command-line) trainer's own helpers."""

from __future__ import annotations

from pathlib import Path

from stage1_core.config import Stage1ProConfig
from stage1_core.data.datasets import Sample
from stage1_core.data.splits import load_splits, make_splits
from stage1_core.training.standalone import build_splits


def _samples(prefix: str, n: int) -> list[Sample]:
    return [Sample(f"{prefix}/{i}.png", Path(f"/x/{prefix}/{i}.png"), i % 2, "natix", i + 2) for i in range(n)]


def test_build_splits_uses_split_seed_not_training_seed(tmp_path: Path) -> None:
    train, val = _samples("train", 10), _samples("val", 300)
    base = build_splits(Stage1ProConfig(seed=1, split_seed=7), train, val, tmp_path / "a")
    other_seed = build_splits(Stage1ProConfig(seed=2, split_seed=7), train, val, tmp_path / "b")
    other_split_seed = build_splits(Stage1ProConfig(seed=1, split_seed=8), train, val, tmp_path / "c")
    ratios = (0.33, 0.33, 0.34)
    assert base.seed == 7 and base.ids == make_splits(train, val, seed=7, ratios=ratios).ids
    assert other_seed.ids == base.ids  # a new training seed never redraws the validation splits
    assert other_split_seed.ids != base.ids
    assert load_splits(tmp_path / "a" / "splits.json").ids == base.ids
