"""The embedded synthetic data set: layout, determinism, class balance, roadwork evidence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stage1_core.data import synthetic
from stage1_core.data.datasets import NATIXDataset, read_labels_csv
from stage1_core.data.splits import make_splits
from stage1_core.config import Stage1ProConfig
from stage1_core.data.synthetic import (
    DEFAULT_N_VAL,
    TRAIN_POSITIVE_RATE,
    VAL_POSITIVE_RATE,
    SyntheticSummary,
    generate_synthetic_dataset,
    render_scene,
)
from stage1_core.steps.data import ensure_synthetic_data


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
        assert abs(np.mean([p.roadwork for p in plans]) - rate) < 0.02
        assert 0.004 < np.mean([p.flip for p in plans]) < 0.016
        assert {p.quality for p in plans} <= set(range(70, 96))
    assert TRAIN_POSITIVE_RATE == pytest.approx(0.8) and VAL_POSITIVE_RATE == pytest.approx(0.9)
    assert 0 < synthetic.DEFAULT_LABEL_NOISE <= 0.02


def test_conditions_follow_their_rates_and_never_give_the_label_away() -> None:
    plans = [synthetic._image_plan(0, "train", i, 0.5, 0.0) for i in range(6000)]
    pos = [p.conditions for p in plans if p.roadwork]
    neg = [p.conditions for p in plans if not p.roadwork]
    for tier, share in synthetic.POSITIVE_TIERS.items():
        assert abs(np.mean([c.tier == tier for c in pos]) - share) < 0.03
    assert {c.tier for c in neg} == {"plain", "hard"}
    assert abs(np.mean([c.tier == "hard" for c in neg]) - synthetic.HARD_NEGATIVE_RATE) < 0.03
    for group in (pos, neg):  # the same rates for both classes
        for light, share in synthetic.LIGHTING.items():
            assert abs(np.mean([c.light == light for c in group]) - share) < 0.03
        for weather, share in synthetic.WEATHER.items():
            assert abs(np.mean([c.weather == weather for c in group]) - share) < 0.03
        assert abs(np.mean([c.occluded for c in group]) - synthetic.OCCLUSION_RATE) < 0.03
    assert sum(synthetic.POSITIVE_TIERS.values()) == pytest.approx(1.0)
    assert synthetic.POSITIVE_TIERS["clear"] < 0.75  # a good share of the roadwork is hard to see


def test_image_conditions_replays_the_plan_of_the_written_image(small_synthetic: SyntheticSummary) -> None:
    labels = dict(line.split(",") for line in small_synthetic.val_labels_file.read_text().splitlines()[1:])
    for i in range(16):
        info = synthetic.image_conditions(3, "val", i)
        plan = synthetic._image_plan(3, "val", i, VAL_POSITIVE_RATE, synthetic.DEFAULT_LABEL_NOISE)
        assert info == {"roadwork": plan.roadwork, "flipped": plan.flip, "label": int(labels[f"val_{i:06d}.jpg"]),
                        **plan.conditions.to_dict()}
        assert (info["tier"] in synthetic.POSITIVE_TIERS) == info["roadwork"]


def test_tier_must_match_the_label() -> None:
    with pytest.raises(ValueError, match="does not match roadwork=False"):
        render_scene(np.random.default_rng(0), False, synthetic.Conditions("clear", "day", "clear", False))
    with pytest.raises(ValueError, match="unknown tier 'huge'"):
        render_scene(np.random.default_rng(0), True, synthetic.Conditions("huge", "day", "clear", False))


def test_flipped_labels_are_reported_and_applied(tmp_path: Path) -> None:
    summary = generate_synthetic_dataset(tmp_path / "noisy", n_train=4, n_val=30, seed=0, label_noise=0.3, progress=False)
    labels = dict(line.split(",") for line in summary.val_labels_file.read_text().splitlines()[1:])
    assert 0 < len(summary.val_flipped) < 30
    for i in range(30):
        name = f"val_{i:06d}.jpg"
        plan = synthetic._image_plan(0, "val", i, VAL_POSITIVE_RATE, 0.3)
        assert (name in summary.val_flipped) == plan.flip
        assert int(labels[name]) == int(plan.roadwork) ^ int(plan.flip)
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


def _fractions(tier: str, n: int = 20, **conditions: object) -> np.ndarray:
    cond = {"light": "day", "weather": "clear", "occluded": False, **conditions}
    return np.array([
        _roadwork_colour_fraction(render_scene(np.random.default_rng([11, i]), tier in synthetic.POSITIVE_TIERS,
                                               synthetic.Conditions(tier, **cond)))  # type: ignore[arg-type]
        for i in range(n)
    ])


def test_visibility_tiers_from_clear_to_small_but_never_absent() -> None:
    clear, distant, sparse, partial, tiny = (_fractions(t) for t in ("clear", "distant", "sparse", "partial", "tiny"))
    plain = _fractions("plain")
    assert clear.min() > 0.05  # a clear zone is large and saturated
    for small in (distant, sparse, partial):
        assert np.median(small) < np.median(clear) / 1.6  # small, distant or hidden ...
        assert small.min() > 0.001  # ... but there: a roadwork label always has roadwork in the crop
    assert np.median(tiny) < np.median(clear) / 10 and tiny.min() > 0.0005  # a cone or a sign far away
    assert np.median(plain) < 0.005 and np.mean(plain > 0.03) < 0.1


def test_partial_zone_is_mostly_hidden_behind_its_occluder() -> None:
    scene = synthetic._Scene(width=360, height=260, horizon=110, vanish_x=180, road_half=115)
    box = synthetic._eval_crop_box(scene)
    for i in range(10):
        rng = np.random.default_rng([21, i])
        layer = Image.new("RGBA", (scene.width, scene.height), (0, 0, 0, 0))
        before, _ = synthetic._draw_roadwork(layer, scene, rng, "partial")
        occluder = synthetic._partial_occluder(layer, scene, rng)
        ImageDraw.Draw(layer).rectangle(occluder, fill=(0, 0, 0, 0))
        after = synthetic._crop_coverage(layer, box)
        assert before > 0.15  # a clear zone before it is hidden
        assert 0.005 < after < 0.6 * before


def test_night_is_dark_and_fog_washes_out_the_far_field() -> None:
    def luma(light: str, weather: str = "clear") -> float:
        images = [render_scene(np.random.default_rng([13, i]), True, synthetic.Conditions("clear", light, weather, False))
                  for i in range(8)]
        return float(np.mean([np.asarray(im.convert("L"), dtype=float).mean() for im in images]))

    assert luma("night") < 0.5 * luma("day")
    assert _fractions("clear", n=8, light="night").mean() < 0.5 * _fractions("clear", n=8).mean()
    assert _fractions("distant", n=8, weather="fog").mean() < _fractions("distant", n=8).mean()


def test_hard_negatives_are_orange_vehicles_red_or_orange_signs_obstacles_trees_and_stripes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(synthetic, "_draw_car", lambda d, s, r, color=None: seen.append(("car", color)))
    monkeypatch.setattr(synthetic, "_draw_service_truck", lambda d, s, r: seen.append(("truck", None)) or [])
    monkeypatch.setattr(synthetic, "_draw_pole_sign", lambda d, s, r, kind: seen.append(("sign", kind)))
    for name in ("_draw_plain_obstacle", "_draw_concrete_barrier", "_draw_bollards"):
        monkeypatch.setattr(synthetic, name, lambda d, s, r: seen.append(("obstacle", None)))
    monkeypatch.setattr(synthetic, "_draw_tree", lambda d, s, r, foliage=None: seen.append(("tree", foliage)))
    monkeypatch.setattr(synthetic, "_draw_chevron_board", lambda d, s, r: seen.append(("striped", "chevron")))
    monkeypatch.setattr(synthetic, "_draw_barrier_arm", lambda d, s, r: seen.append(("striped", "arm")))
    scene = synthetic._Scene(width=320, height=240, horizon=100, vanish_x=160, road_half=100)
    rng = np.random.default_rng(0)
    for _ in range(200):
        synthetic._draw_hard_negative(None, scene, rng)
    assert {kind for kind, _ in seen} == {"car", "truck", "sign", "obstacle", "tree", "striped"}
    cars = [color for kind, color in seen if kind == "car"]
    assert all(color[0] > 230 and color[2] < 30 for color in cars)  # saturated orange bodies
    assert {detail for kind, detail in seen if kind == "sign"} == {"stop", "speed", "give_way", "orange_plain"}
    assert all(f[0] > f[1] > f[2] for kind, f in seen if kind == "tree")  # autumn foliage
    assert {detail for kind, detail in seen if kind == "striped"} == {"chevron", "arm"}
    assert 0 < synthetic.HARD_NEGATIVE_RATE < 0.6


def test_service_truck_carries_an_amber_light_for_night_scenes() -> None:
    scene = synthetic._Scene(width=320, height=240, horizon=100, vanish_x=160, road_half=100)
    layer = Image.new("RGBA", (320, 240), (0, 0, 0, 0))
    lights = synthetic._draw_service_truck(ImageDraw.Draw(layer), scene, np.random.default_rng(1))
    assert len(lights) == 1 and lights[0][3][0] == 255 and lights[0][3][2] < 60
    assert np.count_nonzero(np.asarray(layer.getchannel("A"))) > 100


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


def test_cached_data_set_of_another_generator_version_is_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Stage1ProConfig.from_dict({"data_source": "synthetic", "model_path": "builtin:tiny-dinov3",
                                        "synthetic_n_train": 10, "synthetic_n_val": 30, "synthetic_seed": 2})
    root = tmp_path / "synthetic"
    first = ensure_synthetic_data(config, root)
    marker = json.loads((root / "synthetic.json").read_text())
    assert first["generated"] and marker["params"]["generator_version"] == synthetic.GENERATOR_VERSION
    assert first["generator_version"] == synthetic.GENERATOR_VERSION
    digests = _digests(root / "val")
    assert not ensure_synthetic_data(config, root)["generated"]  # same version: reused
    (root / "stale.txt").write_text("left by the old generator")
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    again = ensure_synthetic_data(config, root)
    assert again["generated"] and again["generator_version"] == synthetic.GENERATOR_VERSION
    assert json.loads((root / "synthetic.json").read_text())["params"]["generator_version"] == synthetic.GENERATOR_VERSION
    assert not (root / "stale.txt").exists()  # the old data set is deleted, not mixed with the new
    assert _digests(root / "val") == digests  # same generator code and seed: same bytes
    assert not ensure_synthetic_data(config, root)["generated"]


def test_marker_without_a_generator_version_is_regenerated(tmp_path: Path) -> None:
    """A data set cached before versions were recorded was made by version 1: never reuse it."""
    config = Stage1ProConfig.from_dict({"data_source": "synthetic", "model_path": "builtin:tiny-dinov3",
                                        "synthetic_n_train": 10, "synthetic_n_val": 30, "synthetic_seed": 2})
    root = tmp_path / "synthetic"
    ensure_synthetic_data(config, root)
    marker = json.loads((root / "synthetic.json").read_text())
    del marker["params"]["generator_version"]
    (root / "synthetic.json").write_text(json.dumps(marker))
    assert ensure_synthetic_data(config, root)["generated"]
