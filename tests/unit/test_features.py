"""Feature cache: extraction, manifest, reuse with zero forward passes, legacy import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from stage1_core.features import (
    FeatureCacheError,
    TensorSplit,
    cache_is_valid,
    cache_key,
    extract_split_features,
    import_legacy_cache,
    load_cached_features,
    load_legacy_features,
    read_manifest,
)
from stage1_core.model.backbone import DINOv3Backbone
from tests.unit.test_backbone import save_small_backbone

TRANSFORM = "Compose[test-transform]"


class TinyImages(Dataset):
    """Random 32x32 images with ids and labels (what a LabelledImageDataset offers)."""

    def __init__(self, n: int, seed: int = 0, prefix: str = "img") -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = [int(x) for x in (torch.arange(n) % 3 != 0).long()]
        self.sample_ids = [f"{prefix}_{i:03d}.jpg" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> DINOv3Backbone:
    return DINOv3Backbone.load(save_small_backbone(tmp_path_factory.mktemp("bb")))


def _extract(backbone, datasets, out, **kw):
    return extract_split_features(
        backbone, datasets, out, TRANSFORM, batch_size=kw.pop("batch_size", 4), device="cpu", progress=False,
        num_workers=0, **kw,
    )


def test_extraction_writes_baseline_files_and_manifest(tmp_path, backbone):
    datasets = {"train": TinyImages(10), "val": TinyImages(7, seed=1, prefix="v")}
    manifest = _extract(backbone, datasets, tmp_path)
    assert manifest.forward_passes == 3 + 2
    for split in ("train", "val"):
        assert (tmp_path / f"{split}_features.pt").is_file() and (tmp_path / f"{split}_labels.pt").is_file()
    features = torch.load(tmp_path / "train_features.pt", weights_only=True)
    labels = torch.load(tmp_path / "train_labels.pt", weights_only=True)
    assert isinstance(features, torch.Tensor) and features.shape == (10, 32) and features.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == datasets["train"].labels
    assert torch.allclose(features, backbone.extract(datasets["train"].images), atol=1e-5)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["backbone_fingerprint"] == backbone.fingerprint() and doc["transform"] == TRANSFORM
    assert doc["hidden_size"] == 32 and doc["dtype"] == "float32" and doc["created_at"]
    assert doc["splits"]["val"]["sample_ids"] == datasets["val"].sample_ids
    assert doc["splits"]["train"]["label_counts"] == {"0": 4, "1": 6}
    ids = {s: d.sample_ids for s, d in datasets.items()}
    assert doc["key"] == cache_key(backbone.fingerprint(), TRANSFORM, ids)
    loaded = load_cached_features(tmp_path)
    assert loaded["val"].sample_ids == tuple(datasets["val"].sample_ids)
    assert torch.equal(loaded["train"].features, features)


def test_second_extraction_does_zero_forward_passes(tmp_path, backbone):
    datasets = {"train": TinyImages(9), "val": TinyImages(5, seed=1, prefix="v")}
    _extract(backbone, datasets, tmp_path)
    ids = {s: d.sample_ids for s, d in datasets.items()}
    assert cache_is_valid(tmp_path, backbone.fingerprint(), ids, TRANSFORM)
    before = backbone.forward_passes
    again = _extract(backbone, datasets, tmp_path)
    assert again.forward_passes == 0 and backbone.forward_passes == before
    assert set(again.reused_splits) == {"train", "val"}


def test_changes_invalidate_only_what_changed(tmp_path, backbone):
    datasets = {"train": TinyImages(8), "val": TinyImages(6, seed=1, prefix="v")}
    _extract(backbone, datasets, tmp_path)
    fp = backbone.fingerprint()
    ids = {s: d.sample_ids for s, d in datasets.items()}
    assert not cache_is_valid(tmp_path, fp, ids, TRANSFORM + "!")
    assert not cache_is_valid(tmp_path, "0" * 64, ids, TRANSFORM)
    assert not cache_is_valid(tmp_path, fp, {**ids, "val": ids["val"][::-1]}, TRANSFORM)
    assert not cache_is_valid(tmp_path, fp, {**ids, "val_test": ["x"]}, TRANSFORM)
    assert cache_key(fp, TRANSFORM, ids) != cache_key(fp, TRANSFORM, {**ids, "val": ids["val"][:-1]})
    changed = {"train": datasets["train"], "val": TinyImages(4, seed=2, prefix="w")}
    manifest = _extract(backbone, changed, tmp_path)
    assert manifest.reused_splits == ("train",) and manifest.forward_passes == 1
    with open(tmp_path / "train_features.pt", "ab") as handle:
        handle.write(b"tampered")
    assert not cache_is_valid(tmp_path, fp, {"train": ids["train"]}, TRANSFORM)
    with pytest.raises(FeatureCacheError, match="changed since extraction"):
        load_cached_features(tmp_path, ["train"])


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(FeatureCacheError, match="manifest.json: file not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FeatureCacheError, match="not a feature-cache manifest"):
        read_manifest(tmp_path)


def _legacy_cache(directory: Path, n_train: int = 6, n_val: int = 5) -> None:
    g = torch.Generator().manual_seed(3)
    for split, n in (("train", n_train), ("val", n_val)):
        torch.save(torch.randn(n, 16, generator=g), directory / f"{split}_features.pt")
        torch.save((torch.arange(n) % 2).long(), directory / f"{split}_labels.pt")


def test_import_legacy_cache(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    _legacy_cache(old)
    ids = {"train": [f"t{i}" for i in range(6)], "val": [f"v{i}" for i in range(5)]}
    labels = {"train": [i % 2 for i in range(6)], "val": [i % 2 for i in range(5)]}
    manifest = import_legacy_cache(
        old, new, sample_ids=ids, backbone_fingerprint="f" * 64, transform_desc=TRANSFORM, expected_labels=labels
    )
    assert manifest.source == "legacy-import" and manifest.hidden_size == 16
    assert cache_is_valid(new, "f" * 64, ids, TRANSFORM)
    loaded = load_cached_features(new)
    assert torch.equal(loaded["train"].features, torch.load(old / "train_features.pt", weights_only=True))
    assert loaded["val"].sample_ids == tuple(ids["val"])
    legacy = load_legacy_features(old)
    assert legacy["val"].sample_ids is None and len(legacy["val"]) == 5


def test_import_legacy_cache_reports_mismatches(tmp_path):
    _legacy_cache(tmp_path)
    ids = {"train": [f"t{i}" for i in range(6)], "val": [f"v{i}" for i in range(4)]}
    with pytest.raises(FeatureCacheError, match=r"val: 5 rows in .*val_features.pt but 4 sample ids given"):
        import_legacy_cache(tmp_path, tmp_path, sample_ids=ids, backbone_fingerprint="f", transform_desc=TRANSFORM)
    ids["val"].append("v4")
    wrong = {"train": [1 - (i % 2) if i == 2 else i % 2 for i in range(6)]}
    with pytest.raises(FeatureCacheError, match=r"train: 1 stored label\(s\) differ .*row 2 \(t2\): file 0 vs csv 1"):
        import_legacy_cache(
            tmp_path, tmp_path, sample_ids=ids, backbone_fingerprint="f", transform_desc=TRANSFORM, expected_labels=wrong
        )
    with pytest.raises(FeatureCacheError, match="legacy cache lacks"):
        load_legacy_features(tmp_path / "nothing")


def test_tensor_split_subset_and_checks():
    split = TensorSplit(torch.arange(12.0).view(6, 2), torch.tensor([0, 1, 0, 1, 1, 0]), tuple("abcdef"), "val")
    sub = split.subset(["e", "a"], "val_select")
    assert sub.name == "val_select" and sub.sample_ids == ("e", "a")
    assert torch.equal(sub.features, torch.tensor([[8.0, 9.0], [0.0, 1.0]])) and sub.labels.tolist() == [1, 0]
    with pytest.raises(FeatureCacheError, match="not in split 'val'"):
        split.subset(["z"])
    with pytest.raises(ValueError, match="labels must be"):
        TensorSplit(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 sample ids for 3 rows"):
        TensorSplit(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), ("a", "b"))


def _jpeg_samples(directory: Path, n: int = 9):
    import numpy as np
    from PIL import Image

    from stage1_core.data.datasets import Sample

    rng = np.random.default_rng(5)
    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        w, h = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        path = directory / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=85)
        samples.append(Sample(f"{i}.jpg", path, i % 2, "natix", i + 2))
    return samples


def test_split_eval_path_gives_the_features_of_the_per_image_transform(tmp_path, backbone):
    from stage1_core.data.datasets import LabelledImageDataset
    from stage1_core.data.transforms import build_eval_transform

    samples = _jpeg_samples(tmp_path / "images")
    transform = build_eval_transform(image_size=32, resize=36)
    fast = LabelledImageDataset(samples, transform=transform)
    assert fast.eval_pixels() is not None
    per_image = LabelledImageDataset(samples, transform=lambda image: transform(image))
    assert per_image.eval_pixels() is None
    got = {}
    for name, dataset, workers in (("fast", fast, 2), ("per_image", per_image, 0)):
        extract_split_features(backbone, {"val": dataset}, tmp_path / name, TRANSFORM, batch_size=4, device="cpu",
                               progress=False, num_workers=workers)
        got[name] = load_cached_features(tmp_path / name)["val"]
    assert torch.allclose(got["fast"].features, got["per_image"].features, atol=1e-5)
    assert torch.equal(got["fast"].labels, got["per_image"].labels)


def test_a_second_writer_of_the_same_cache_directory_is_refused(tmp_path, backbone, monkeypatch):
    from stage1_core.locking import LOCK_NAME, LOCK_TIMEOUT_ENV, AssetLockedError, path_lock

    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    with path_lock(tmp_path / LOCK_NAME, "held by this test"):
        with pytest.raises(AssetLockedError, match=rf"feature cache {tmp_path} is being written by another run"):
            _extract(backbone, {"train": TinyImages(4)}, tmp_path)
    assert _extract(backbone, {"train": TinyImages(4)}, tmp_path).forward_passes == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_file_is_refused_by_name_and_only_its_split_recomputed(tmp_path, backbone, damage):
    datasets = {"train": TinyImages(8), "val": TinyImages(5, seed=1, prefix="v")}
    first = _extract(backbone, datasets, tmp_path)
    before = load_cached_features(tmp_path)
    path = tmp_path / first.splits["val"]["features_file"]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(FeatureCacheError, match=rf"{path} is corrupt or changed since extraction"):
        load_cached_features(tmp_path, splits=["val"])
    assert load_cached_features(tmp_path, splits=["train"])["train"].features.shape == (8, backbone.hidden_size)
    assert not cache_is_valid(tmp_path, backbone.fingerprint(), {k: d.sample_ids for k, d in datasets.items()}, TRANSFORM)
    again = _extract(backbone, datasets, tmp_path)
    assert again.reused_splits == ("train",) and again.forward_passes == 2  # val only: 5 images, batch 4
    assert torch.equal(load_cached_features(tmp_path)["val"].features, before["val"].features)
