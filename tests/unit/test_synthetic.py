"""The embedded synthetic data set: layout, determinism, class balance, roadwork evidence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_core.data import synthetic
from stage1_core.data.datasets import NATIXDataset, read_labels_csv
from stage1_core.data.splits import make_splits
from stage1_core.data.synthetic import (
    DEFAULT_N_VAL,
    TRAIN_POSITIVE_RATE,
    VAL_POSITIVE_RATE,
    SyntheticSummary,
    generate_synthetic_dataset,
    render_scene,
)


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSummary:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=24, n_val=16, seed=3, progress=False)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_natix_layout(small_synthetic: SyntheticSummary) -> None:
    root = small_synthetic.out_dir
    assert sorted(p.name for p in root.iterdir()) == ["train", "train_labels.csv", "val", "val_labels.csv"]
    for split, n in (("train", 24), ("val", 16)):
        lines = (root / f"{split}_labels.csv").read_text().splitlines()
        assert lines[0] == "image,label" and len(lines) == n + 1
        names = [line.split(",")[0] for line in lines[1:]]
        assert names == [f"{split}_{i:06d}.jpg" for i in range(n)]
        assert {line.split(",")[1] for line in lines[1:]} <= {"0", "1"}
        assert sorted(p.name for p in (root / split).iterdir()) == names
    assert small_synthetic.train_labels_file == root / "train_labels.csv"
    assert small_synthetic.val_dir == root / "val"


def test_readable_by_the_dataset_layer(small_synthetic: SyntheticSummary) -> None:
    s = small_synthetic
    train = read_labels_csv(s.train_labels_file, s.train_dir)
    val = read_labels_csv(s.val_labels_file, s.val_dir)
    assert sum(x.label for x in train) == s.train_positives
    assert sum(x.label for x in val) == s.val_positives
    make_splits(train, val, seed=0)  # train and val ids never collide
    pixels, _ = NATIXDataset(s.val_dir, s.val_labels_file)[0]
    assert pixels.shape == (3, 224, 224)


def test_images_are_jpeg_of_varied_non_224_sizes(small_synthetic: SyntheticSummary) -> None:
    sizes = set()
    for path in sorted(small_synthetic.train_dir.iterdir()):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    widths = {w for w, _ in sizes}
    assert len(sizes) > 10 and (224, 224) not in sizes
    assert min(widths) >= synthetic.WIDTH_RANGE[0] and max(widths) <= synthetic.WIDTH_RANGE[1]
    assert all(w > h for w, h in sizes)


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path: Path, small_synthetic: SyntheticSummary) -> None:
    again = generate_synthetic_dataset(tmp_path / "again", n_train=24, n_val=16, seed=3, progress=False, num_workers=1)
    assert _digests(again.out_dir) == _digests(small_synthetic.out_dir)
    assert again.val_flipped == small_synthetic.val_flipped
    other = generate_synthetic_dataset(tmp_path / "other", n_train=24, n_val=16, seed=4, progress=False, num_workers=1)
    differing = [k for k, v in _digests(other.out_dir).items() if _digests(small_synthetic.out_dir)[k] != v]
    assert len(differing) >= 38


def test_class_balance_and_label_noise_like_natix() -> None:
    n = 4000
    for split, rate in (("train", TRAIN_POSITIVE_RATE), ("val", VAL_POSITIVE_RATE)):
        plans = [synthetic._image_plan(0, split, i, rate, 0.01) for i in range(n)]
        assert abs(np.mean([p[1] for p in plans]) - rate) < 0.02
        assert 0.004 < np.mean([p[2] for p in plans]) < 0.016
        assert {p[3] for p in plans} <= set(range(70, 96))
    assert TRAIN_POSITIVE_RATE == pytest.approx(0.8) and VAL_POSITIVE_RATE == pytest.approx(0.9)


def test_flipped_labels_are_reported_and_applied(tmp_path: Path) -> None:
    summary = generate_synthetic_dataset(tmp_path / "noisy", n_train=4, n_val=30, seed=0, label_noise=0.3, progress=False)
    labels = dict(line.split(",") for line in summary.val_labels_file.read_text().splitlines()[1:])
    assert 0 < len(summary.val_flipped) < 30
    for i in range(30):
        name = f"val_{i:06d}.jpg"
        _, roadwork, flip, _ = synthetic._image_plan(0, "val", i, VAL_POSITIVE_RATE, 0.3)
        assert (name in summary.val_flipped) == flip
        assert int(labels[name]) == int(roadwork) ^ int(flip)
    info = summary.to_dict()
    assert info["val_flipped"] == len(summary.val_flipped) and json.dumps(info)


def _roadwork_colour_fraction(image: Image.Image) -> float:
    """Share of saturated orange or red pixels inside the evaluation centre crop."""
    a = np.asarray(image).astype(int)
    h, w = a.shape[:2]
    half = min(h, w) * 224 / 256 / 2
    a = a[int(h / 2 - half) : int(h / 2 + half), int(w / 2 - half) : int(w / 2 + half)]
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    orange = (r > 170) & (g > 50) & (g < 180) & (b < 100)
    red = (r > 160) & (g < 90) & (b < 90)
    return float((orange | red).mean())


def test_roadwork_is_clearly_visible_and_rare_in_negatives() -> None:
    positives = [_roadwork_colour_fraction(render_scene(np.random.default_rng([11, i]), True)) for i in range(30)]
    negatives = [_roadwork_colour_fraction(render_scene(np.random.default_rng([12, i]), False)) for i in range(30)]
    assert min(positives) > 0.05
    assert np.median(negatives) < 0.01 and np.mean(np.array(negatives) > 0.03) < 0.1


def test_hard_negatives_are_orange_cars_red_or_orange_signs_and_obstacles(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(synthetic, "_draw_car", lambda d, s, r, color=None: seen.append(("car", color)))
    monkeypatch.setattr(synthetic, "_draw_pole_sign", lambda d, s, r, kind: seen.append(("sign", kind)))
    monkeypatch.setattr(synthetic, "_draw_plain_obstacle", lambda d, s, r: seen.append(("obstacle", None)))
    scene = synthetic._Scene(width=320, height=240, horizon=100, vanish_x=160, road_half=100)
    rng = np.random.default_rng(0)
    for _ in range(60):
        synthetic._draw_hard_negative(None, scene, rng)
    assert {kind for kind, _ in seen} == {"car", "sign", "obstacle"}
    cars = [color for kind, color in seen if kind == "car"]
    assert all(color[0] > 230 and color[2] < 30 for color in cars)  # saturated orange bodies
    assert {detail for kind, detail in seen if kind == "sign"} == {"stop", "speed", "give_way", "orange_plain"}
    assert 0 < synthetic.HARD_NEGATIVE_RATE < 0.5


def test_default_size_leaves_enough_calibration_positives() -> None:
    expected = DEFAULT_N_VAL * VAL_POSITIVE_RATE * 0.33
    sd = (DEFAULT_N_VAL * VAL_POSITIVE_RATE * 0.33 * 0.67) ** 0.5
    assert expected - 4 * sd >= 600


def test_progress_bar_and_stale_labels_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "syn"
    root.mkdir()
    (root / "train_labels.csv").write_text("stale")
    generate_synthetic_dataset(root, n_train=2, n_val=2, seed=0, progress=True, num_workers=0)
    assert "synthetic train" in capsys.readouterr().err
    assert (root / "train_labels.csv").read_text().startswith("image,label\n")


@pytest.mark.parametrize(("kwargs", "match"), [({"n_train": 0}, "n_train=0"), ({"label_noise": 0.5}, "label_noise")])
def test_invalid_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_synthetic_dataset(tmp_path, progress=False, **kwargs)
