"""Hostile image files through the data layer, the predictor and ``stage1 predict``.

Unreadable files (zero bytes, truncated JPEG, a PNG header claiming more pixels than PIL's
decompression-bomb limit, text with a ``.jpg`` name) give one clear message each, naming the
file; awkward but valid ones (16-bit PNG, CMYK JPEG, EXIF-rotated JPEG) are decoded the same way
by the data layer and the predictor; ``stage1 predict`` decides the rest and exits 1.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stage1_core import cli
from stage1_core.bundle import Stage1Bundle
from stage1_core.bundle.predictor import load_image
from stage1_core.data.datasets import NATIX_SOURCE, CorruptImageError, Sample, find_corrupt_images, load_rgb
from stage1_core.data.transforms import describe_transform

from tests.unit.test_bundle_export import export_test_bundle
from tests.unit.test_predictor import (  # noqa: F401  (fixtures)
    HIDDEN,
    eval_transform,
    make_head,
    tiny_backbone,
    tiny_backbone_dir,
)

BAD = ("zero_byte", "truncated", "bomb", "not_image")
GOOD = ("ok", "gray16", "cmyk", "exif_rotated")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny file whose header claims width x height RGB pixels (1.6 G, far above PIL's limit)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def scene(size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An asymmetric picture (a rotation changes it)."""
    image = Image.new("RGB", size, (120, 160, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size[1] // 2, size[0], size[1]), fill=(70, 70, 75))
    draw.polygon([(5, size[1] - 4), (15, size[1] - 4), (10, 8)], fill=(250, 120, 20))
    return image


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "images"
    d.mkdir()
    paths = {name: d / f"{name}.{'png' if name in ('bomb', 'gray16') else 'jpg'}" for name in BAD + GOOD}
    scene().save(paths["ok"], quality=92)
    paths["zero_byte"].write_bytes(b"")
    paths["truncated"].write_bytes(paths["ok"].read_bytes()[:300])
    paths["bomb"].write_bytes(bomb_png())
    paths["not_image"].write_bytes(b"GIF? no: just some bytes with an image extension\n" * 20)
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(paths["gray16"])
    Image.new("CMYK", (40, 30), (0, 60, 200, 0)).save(paths["cmyk"], format="JPEG")
    # Stored sideways (40 wide, 48 high) with EXIF orientation 6: shown upright as 48 x 40.
    exif = Image.Exif()
    exif[0x0112] = 6
    scene().transpose(Image.Transpose.ROTATE_90).save(paths["exif_rotated"], quality=92, exif=exif.tobytes())
    return paths


# ----- data layer ---------------------------------------------------------------------------


def test_data_layer_refuses_each_bad_file_naming_it(corpus):
    for name in BAD:
        with pytest.raises(CorruptImageError) as info:
            load_rgb(corpus[name])
        assert str(corpus[name]) in str(info.value), name
        assert info.value.reason, name
    assert "exceeds limit" in str(pytest.raises(CorruptImageError, load_rgb, corpus["bomb"]).value)


def test_find_corrupt_images_lists_exactly_the_bad_files(corpus):
    samples = [Sample(name, path, 1, NATIX_SOURCE, i) for i, (name, path) in enumerate(corpus.items())]
    found = find_corrupt_images(samples, num_threads=2)
    assert sorted(found) == sorted(BAD)
    assert all(isinstance(reason, str) and reason for reason in found.values())


def test_data_layer_decodes_the_awkward_valid_files(corpus):
    for name in GOOD:
        assert load_rgb(corpus[name]).mode == "RGB", name
    assert np.asarray(load_rgb(corpus["gray16"])).max() == round(40000 / 257), "16-bit scaled, not clipped to white"
    upright = load_rgb(corpus["exif_rotated"])
    assert upright.size == (48, 40), "EXIF orientation applied"
    reference = np.asarray(load_rgb(corpus["ok"]), dtype=int)
    assert np.abs(np.asarray(upright, dtype=int) - reference).mean() < 6, "rotated back to the upright scene"


def test_pil_decompression_bomb_limit_is_honoured(corpus, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 48 x 40 = 1920 > 2 x 100: an error, not a warning
    with pytest.raises(CorruptImageError, match="exceeds limit"):
        load_rgb(corpus["ok"])
    with pytest.raises(ValueError, match="exceeds limit") as info:
        load_image(corpus["ok"])
    assert str(corpus["ok"]) in str(info.value)


# ----- predictor ----------------------------------------------------------------------------


def test_predictor_load_image_refuses_each_bad_file_naming_it(corpus, tmp_path):
    for name in BAD:
        with pytest.raises(ValueError) as info:
            load_image(corpus[name])
        assert str(info.value).startswith(f"{corpus[name]}: cannot read the image"), (name, str(info.value))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.jpg")


def test_predictor_decodes_exactly_as_the_data_layer(corpus):
    for name in GOOD:
        np.testing.assert_array_equal(np.asarray(load_image(corpus[name])), np.asarray(load_rgb(corpus[name])), err_msg=name)
    rotated = Image.open(corpus["exif_rotated"])
    assert load_image(rotated).size == (48, 40), "an opened PIL image is oriented too"
    assert load_image(load_image(corpus["exif_rotated"])).size == (48, 40), "orientation is applied once"


def test_transform_outputs_unchanged_for_normal_images(corpus, tmp_path):
    png = tmp_path / "road.png"
    scene((40, 48)).save(png)
    transform = eval_transform()
    for path in (corpus["ok"], png):
        with Image.open(path) as handle:
            before = transform(handle.convert("RGB"))  # what the predictor did before EXIF handling
        torch.testing.assert_close(transform(load_image(path)), before, rtol=0, atol=0)


# ----- stage1 predict -----------------------------------------------------------------------


@pytest.fixture
def image_bundle(tmp_path, tiny_backbone, tiny_backbone_dir):
    info = {
        "model_path": str(tiny_backbone_dir),
        "fingerprint": tiny_backbone.fingerprint(),
        "hidden_size": HIDDEN,
        "transform": describe_transform(eval_transform()),
    }
    return export_test_bundle(tmp_path, make_head(), 0.6, backbone_info=info, out_name="image-bundle")


def run_predict(bundle: Path, paths: list[Path], capsys, *extra: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(["predict", "--bundle", str(bundle), *map(str, paths), "--json", *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_stage1_predict_reports_each_bad_file_once_and_decides_the_rest(image_bundle, corpus, capsys):
    order = ["ok", "zero_byte", "gray16", "truncated", "bomb", "cmyk", "not_image", "exif_rotated"]
    code, out, err = run_predict(image_bundle, [corpus[n] for n in order], capsys, "--batch_size", "3")

    assert code == 1
    errors = [line for line in err if line.startswith("stage1 predict: error:")]
    assert len(errors) == len(BAD), err
    for name in BAD:
        assert sum(str(corpus[name]) in line for line in errors) == 1, (name, errors)
    assert err[-1] == f"stage1 predict: {len(BAD)} of {len(order)} image(s) could not be read and were not decided; the other {len(GOOD)} were"
    rows = [json.loads(line) for line in out]
    assert [row["image"] for row in rows] == [str(corpus[n]) for n in order if n in GOOD]
    expected = Stage1Bundle.load(image_bundle).predict([corpus[n] for n in order if n in GOOD])
    for row, want in zip(rows, expected, strict=True):  # batches differ, so p_roadwork only to float noise
        assert (row["exit"], row["label"], row["prediction_set"]) == (want["exit"], want["label"], want["prediction_set"])
        assert row["p_roadwork"] == pytest.approx(want["p_roadwork"], abs=1e-5)


def test_stage1_predict_exif_rotated_image_is_decided_upright(image_bundle, corpus, capsys, tmp_path):
    upright = tmp_path / "upright.png"
    load_rgb(corpus["exif_rotated"]).save(upright)
    loaded = Stage1Bundle.load(image_bundle)
    assert loaded.predict([corpus["exif_rotated"]]) == loaded.predict([upright])
    sideways = tmp_path / "sideways.png"
    Image.open(corpus["exif_rotated"]).convert("RGB").save(sideways)  # pixels as stored, orientation dropped
    p = [r["p_roadwork"] for r in loaded.predict([upright, sideways])]
    assert p[0] != p[1], "the test image must be orientation-sensitive"


def test_stage1_predict_all_readable_exits_0(image_bundle, corpus, capsys):
    code, out, err = run_predict(image_bundle, [corpus[n] for n in GOOD], capsys)
    assert code == 0 and len(out) == len(GOOD)
    assert not [line for line in err if "error" in line or "could not be read" in line], err


def test_stage1_predict_only_bad_files_exits_1_without_decisions(image_bundle, corpus, capsys):
    code, out, err = run_predict(image_bundle, [corpus["zero_byte"], corpus["bomb"]], capsys)
    assert code == 1 and out == []
    assert len([line for line in err if "error:" in line]) == 2
