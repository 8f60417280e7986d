"""Labels CSV reading (baseline behaviour + validation) and the image datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_core.data.datasets import (
    NATIX_SOURCE,
    CorruptImageError,
    DatasetValidationError,
    LabelledImageDataset,
    MultiRoadworkDataset,
    NATIXDataset,
    Sample,
    find_corrupt_images,
    load_rgb,
    read_labels_csv,
    read_sources,
    to_rgb,
)
from stage1_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _jpeg(path: Path, color=(200, 120, 30), size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)
    return path


def _csv(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture()
def natix_dir(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        _jpeg(images / name)
    return images


@pytest.fixture()
def bad_input_corpus(tmp_path: Path) -> dict[str, Path]:
    """One image folder plus image files of every awkward kind a user's data may hold."""
    images = tmp_path / "corpus"
    images.mkdir()
    ok = _jpeg(images / "ok.jpg")
    truncated = images / "truncated.jpg"
    truncated.write_bytes(ok.read_bytes()[:200])
    not_image = images / "not_image.jpg"
    not_image.write_text("this is not an image")
    cmyk = images / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 60, 200, 0)).save(cmyk, format="JPEG")
    gray = images / "gray.png"
    Image.new("L", (40, 30), 128).save(gray)
    palette = images / "palette_alpha.png"
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 20, 30))  # left half red (index 1), right half index 0 = transparent
    pal.save(palette, transparency=0)
    rgba = images / "rgba.png"
    Image.new("RGBA", (40, 30), (10, 200, 10, 255)).save(rgba)
    gray16 = images / "gray16.png"
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(gray16)
    return {
        "dir": images,
        "ok": ok,
        "truncated": truncated,
        "not_image": not_image,
        "cmyk": cmyk,
        "gray": gray,
        "palette": palette,
        "rgba": rgba,
        "gray16": gray16,
    }


# ----- read_labels_csv: baseline behaviour -----


def test_header_skipped_and_relative_paths_joined(tmp_path: Path, natix_dir: Path) -> None:
    labels = _csv(tmp_path / "labels.csv", "image,label\na.jpg,1\nb.jpg,0\nsub/c.jpg,1\n")
    samples = read_labels_csv(labels, natix_dir)
    assert [s.sample_id for s in samples] == ["a.jpg", "b.jpg", "sub/c.jpg"]
    assert [s.label for s in samples] == [1, 0, 1]
    assert [s.line for s in samples] == [2, 3, 4]
    assert all(s.path.is_absolute() and s.path.is_file() for s in samples)
    assert samples[2].path == (natix_dir / "sub" / "c.jpg").absolute()
    assert {s.source for s in samples} == {NATIX_SOURCE}


def test_no_header_is_read_from_line_one(tmp_path: Path, natix_dir: Path) -> None:
    labels = _csv(tmp_path / "labels.csv", "a.jpg,1\nb.jpg,0\n")
    samples = read_labels_csv(labels, natix_dir)
    assert [(s.sample_id, s.line) for s in samples] == [("a.jpg", 1), ("b.jpg", 2)]


def test_absolute_path_kept_and_id_relative_to_image_dir(tmp_path: Path, natix_dir: Path) -> None:
    outside = _jpeg(tmp_path / "elsewhere" / "x.jpg")
    inside = (natix_dir / "a.jpg").absolute()
    labels = _csv(tmp_path / "labels.csv", f"image,label\n{inside},1\n{outside.absolute()},0\n")
    samples = read_labels_csv(labels, natix_dir)
    assert samples[0].path == inside and samples[0].sample_id == "a.jpg"
    assert samples[1].path == outside.absolute() and samples[1].sample_id == outside.absolute().as_posix()


def test_ids_are_normalised_posix_and_prefixed_for_other_sources(tmp_path: Path, natix_dir: Path) -> None:
    labels = _csv(tmp_path / "labels.csv", "image,label\n./a.jpg,1\nsub//c.jpg,0\n")
    assert [s.sample_id for s in read_labels_csv(labels, natix_dir)] == ["a.jpg", "sub/c.jpg"]
    assert [s.sample_id for s in read_labels_csv(labels, natix_dir, source="iccv")] == ["iccv/a.jpg", "iccv/sub/c.jpg"]


def test_sample_is_frozen(tmp_path: Path, natix_dir: Path) -> None:
    sample = read_labels_csv(_csv(tmp_path / "l.csv", "a.jpg,1\n"), natix_dir)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.label = 0  # type: ignore[misc]


def test_bom_crlf_blank_lines_and_spaces_accepted(tmp_path: Path, natix_dir: Path) -> None:
    text = "\ufeffimage,label\r\na.jpg, 1\r\n\r\n b.jpg ,0\r\n"
    samples = read_labels_csv(_csv(tmp_path / "l.csv", text), natix_dir)
    assert [(s.sample_id, s.label, s.line) for s in samples] == [("a.jpg", 1, 2), ("b.jpg", 0, 4)]


def test_quoted_path_with_comma(tmp_path: Path, natix_dir: Path) -> None:
    _jpeg(natix_dir / "a,b.jpg")
    samples = read_labels_csv(_csv(tmp_path / "l.csv", 'image,label\n"a,b.jpg",1\n'), natix_dir)
    assert samples[0].sample_id == "a,b.jpg"


# ----- read_labels_csv: every problem at once -----


def test_all_problems_reported_together_with_file_and_line(tmp_path: Path, natix_dir: Path) -> None:
    text = "image,label\na.jpg,2\nb.jpg\nmissing.jpg,1\nsub/c.jpg,1\nsub/c.jpg,0\nb.jpg,yes\n,1\na.jpg,1,extra\n"
    labels = _csv(tmp_path / "labels.csv", text)
    with pytest.raises(DatasetValidationError) as info:
        read_labels_csv(labels, natix_dir)
    problems = info.value.problems
    assert isinstance(info.value, ValueError)
    assert len(problems) == 7
    where = [p.split(": ", 1)[0] for p in problems]
    assert where == [f"{labels}:{n}" for n in (2, 3, 4, 6, 7, 8, 9)]
    assert "label '2'" in problems[0] and "0 or 1" in problems[0]
    assert "malformed" in problems[1] and "got 1" in problems[1]
    assert "not found" in problems[2] and "missing.jpg" in problems[2]
    assert "duplicate" in problems[3] and "line 5" in problems[3]
    assert "label 'yes'" in problems[4]
    assert "empty image path" in problems[5]
    assert "got 3" in problems[6]
    # Every message says what to do about it.
    assert all(" - " in p for p in problems)
    assert str(info.value).startswith("7 problems")


def test_unreadable_csv_line_reported_and_reading_goes_on(tmp_path: Path, natix_dir: Path) -> None:
    labels = _csv(tmp_path / "l.csv", 'image,label\n"' + "x" * 200_000 + '",1\nmissing.jpg,1\na.jpg,1\n')
    with pytest.raises(DatasetValidationError) as info:
        read_labels_csv(labels, natix_dir)
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith(f"{labels}:2: unreadable CSV line")
    assert info.value.problems[1].startswith(f"{labels}:3: image file not found")


def test_duplicates_detected_after_path_normalisation(tmp_path: Path, natix_dir: Path) -> None:
    labels = _csv(tmp_path / "l.csv", f"a.jpg,1\n./a.jpg,1\n{(natix_dir / 'a.jpg').absolute()},0\n")
    with pytest.raises(DatasetValidationError) as info:
        read_labels_csv(labels, natix_dir)
    assert len(info.value.problems) == 2
    assert all("duplicate" in p and "line 1" in p for p in info.value.problems)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file"),
        (b"  \n\r\n", "empty file"),
        (b"image,label\n", "header only"),
        (b"\xef\xbb\xbfimage,label\r\n", "header only"),
        (b"image,label\n\xff\xfe,1\n", "not UTF-8"),
    ],
)
def test_empty_header_only_and_undecodable_csv(tmp_path: Path, natix_dir: Path, content: bytes, expected: str) -> None:
    labels = _csv(tmp_path / "l.csv", content)
    with pytest.raises(DatasetValidationError) as info:
        read_labels_csv(labels, natix_dir)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{labels}: ")
    assert expected in info.value.problems[0]


def test_missing_labels_file_and_image_dir(tmp_path: Path, natix_dir: Path) -> None:
    with pytest.raises(DatasetValidationError, match="labels file not found"):
        read_labels_csv(tmp_path / "nope.csv", natix_dir)
    labels = _csv(tmp_path / "l.csv", "a.jpg,1\n")
    with pytest.raises(DatasetValidationError) as info:
        read_labels_csv(labels, tmp_path / "no_dir")
    assert any("image folder not found" in p for p in info.value.problems)
    assert any(f"{labels}:1" in p and "not found" in p for p in info.value.problems)


# ----- image decoding and colour modes -----


def test_to_rgb_handles_every_mode(bad_input_corpus: dict[str, Path]) -> None:
    for key in ("ok", "cmyk", "gray", "palette", "rgba", "gray16"):
        image = load_rgb(bad_input_corpus[key])
        assert image.mode == "RGB", key
        assert image.size == (64, 48) if key == "ok" else image.size == (40, 30)
    palette = np.asarray(load_rgb(bad_input_corpus["palette"]))
    assert tuple(palette[10, 5]) == (255, 0, 0)  # opaque red half
    assert tuple(palette[10, 35]) == (255, 255, 255)  # transparent half composited on white
    gray16 = np.asarray(load_rgb(bad_input_corpus["gray16"]))
    assert gray16.min() == gray16.max() == round(40000 / 257)  # 16-bit range scaled to 8 bits, not clipped
    gray = np.asarray(load_rgb(bad_input_corpus["gray"]))
    assert (gray == 128).all()
    cmyk = np.asarray(load_rgb(bad_input_corpus["cmyk"]), dtype=int)
    assert cmyk[..., 2].mean() < 100 < cmyk[..., 0].mean()  # yellow-ish: lots of red, little blue


def test_to_rgb_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.info["exif"] = exif.tobytes()
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    buffer.seek(0)
    assert to_rgb(Image.open(buffer)).size == (20, 40)


@pytest.mark.parametrize("key", ["truncated", "not_image"])
def test_undecodable_image_names_the_file(bad_input_corpus: dict[str, Path], key: str) -> None:
    with pytest.raises(CorruptImageError) as info:
        load_rgb(bad_input_corpus[key])
    assert str(bad_input_corpus[key]) in str(info.value)
    assert "skip_corrupt" in str(info.value)


def test_find_corrupt_images(bad_input_corpus: dict[str, Path]) -> None:
    samples = [Sample(k, p, 1, NATIX_SOURCE, i) for i, (k, p) in enumerate(bad_input_corpus.items()) if k != "dir"]
    corrupt = find_corrupt_images(samples, num_threads=2)
    assert set(corrupt) == {"truncated", "not_image"}
    assert all(reason for reason in corrupt.values())


# ----- datasets -----


def _corpus_csv(tmp_path: Path, corpus: dict[str, Path]) -> Path:
    names = [p.name for k, p in corpus.items() if k != "dir"]
    return _csv(tmp_path / "corpus.csv", "image,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))


def test_natix_dataset_returns_normalised_tensor_and_label(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    _jpeg(images / "gray.jpg", color=(128, 128, 128), size=(300, 200))
    ds = NATIXDataset(images, _csv(tmp_path / "l.csv", "image,label\ngray.jpg,1\n"))
    pixels, label = ds[0]
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert label == 1
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=0.02)
    assert ds.sample_ids == ["gray.jpg"] and ds.labels == [1] and ds.sources == [NATIX_SOURCE]


def test_every_colour_mode_goes_through_the_dataset(tmp_path: Path, bad_input_corpus: dict[str, Path]) -> None:
    corpus = {k: v for k, v in bad_input_corpus.items() if k not in ("truncated", "not_image")}
    ds = NATIXDataset(bad_input_corpus["dir"], _corpus_csv(tmp_path, corpus))
    for i in range(len(ds)):
        pixels, _ = ds[i]
        assert pixels.shape == (3, 224, 224) and torch.isfinite(pixels).all()


def test_corrupt_image_raises_by_default_and_is_skipped_and_counted_on_request(
    tmp_path: Path, bad_input_corpus: dict[str, Path]
) -> None:
    labels = _corpus_csv(tmp_path, bad_input_corpus)
    strict = NATIXDataset(bad_input_corpus["dir"], labels)
    assert len(strict) == 8
    index = strict.sample_ids.index("truncated.jpg")
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        strict[index]
    lenient = NATIXDataset(bad_input_corpus["dir"], labels, skip_corrupt=True)
    assert len(lenient) == 6
    assert set(lenient.skipped) == {"truncated.jpg", "not_image.jpg"}
    stats = lenient.statistics()[NATIX_SOURCE]
    assert stats["skipped_corrupt"] == 2 and stats["total"] == 6
    assert stats["roadwork"] + stats["no_roadwork"] == 6
    for i in range(len(lenient)):
        lenient[i]


def test_processor_mean_std_used_and_custom_transform(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    _jpeg(images / "x.jpg", color=(255, 255, 255))
    labels = _csv(tmp_path / "l.csv", "x.jpg,0\n")

    class Processor:
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.5, 0.5, 0.5]

    pixels, _ = NATIXDataset(images, labels, processor=Processor())[0]
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=0.02)
    ds = NATIXDataset(images, labels, transform=lambda img: torch.tensor(img.size))
    assert ds[0][0].tolist() == [64, 48]


def test_augment_uses_training_transform(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    images.mkdir()
    Image.fromarray(rng.integers(0, 255, (260, 340, 3), dtype=np.uint8)).save(images / "n.png")
    labels = _csv(tmp_path / "l.csv", "n.png,1\n")
    torch.manual_seed(0)
    ds = NATIXDataset(images, labels, augment=True, augmentation="aggressive")
    first, second = ds[0][0], ds[0][0]
    assert first.shape == (3, 224, 224) and not torch.equal(first, second)
    evaluation = NATIXDataset(images, labels)
    assert torch.equal(evaluation[0][0], evaluation[0][0])


def test_multi_roadwork_dataset_tracks_sources_and_statistics(tmp_path: Path) -> None:
    natix, extra = tmp_path / "natix", tmp_path / "extra"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(natix / name)
    _jpeg(extra / "a.jpg")
    _jpeg(extra / "z.jpg")
    natix_csv = _csv(tmp_path / "natix.csv", "image,label\na.jpg,1\nb.jpg,0\nc.jpg,1\n")
    extra_csv = _csv(tmp_path / "extra.csv", "image,label\na.jpg,1\nz.jpg,1\n")
    ds = MultiRoadworkDataset(
        [
            {"name": NATIX_SOURCE, "image_dir": natix, "labels_file": natix_csv},
            ("roadwork_extra", str(extra), str(extra_csv)),
        ]
    )
    assert ds.sample_ids == ["a.jpg", "b.jpg", "c.jpg", "roadwork_extra/a.jpg", "roadwork_extra/z.jpg"]
    assert ds.sources == [NATIX_SOURCE] * 3 + ["roadwork_extra"] * 2
    assert ds.statistics() == {
        NATIX_SOURCE: {"total": 3, "roadwork": 2, "no_roadwork": 1, "skipped_corrupt": 0},
        "roadwork_extra": {"total": 2, "roadwork": 2, "no_roadwork": 0, "skipped_corrupt": 0},
    }
    assert ds[4][0].shape == (3, 224, 224)


def test_multi_source_problems_reported_together(tmp_path: Path, natix_dir: Path) -> None:
    bad_a = _csv(tmp_path / "a.csv", "a.jpg,7\n")
    bad_b = _csv(tmp_path / "b.csv", "image,label\n")
    good = _csv(tmp_path / "good.csv", "a.jpg,1\n")
    with pytest.raises(DatasetValidationError) as info:
        read_sources(
            [
                ("natix", natix_dir, bad_a),
                {"source": "other", "image_dir": natix_dir, "labels_file": bad_b},
                ("natix", natix_dir, good),
                {"image_dir": natix_dir},
                "not a config",
            ]
        )
    problems = info.value.problems
    assert len(problems) == 5
    assert f"{bad_a}:1" in problems[0] and f"{bad_b}: header only" in problems[1]
    assert "listed twice" in problems[2] and "dataset_configs[2]" in problems[2]
    assert "dataset_configs[3]" in problems[3] and "source (or name)" in problems[3] and "labels_file" in problems[3]
    assert "dataset_configs[4]" in problems[4] and "unsupported" in problems[4]


def test_labelled_dataset_from_samples(natix_dir: Path) -> None:
    samples = [Sample("x", (natix_dir / "a.jpg").absolute(), 0, "s1", 1), Sample("y", (natix_dir / "b.jpg").absolute(), 1, "s2", 2)]
    ds = LabelledImageDataset(samples)
    assert len(ds) == 2 and ds[1][1] == 1
    assert ds.statistics()["s2"] == {"total": 1, "roadwork": 1, "no_roadwork": 0, "skipped_corrupt": 0}


def test_eval_pixels_equal_the_dataset_output_and_only_for_the_eval_transform(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from stage1_core.data.datasets import LabelledImageDataset, Sample

    rng = np.random.default_rng(0)
    samples = []
    for i, (w, h) in enumerate([(300, 200), (180, 260), (640, 480)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append(Sample(f"{i}.jpg", path, i % 2, "natix", i + 2))
    dataset = LabelledImageDataset(samples)
    pixels, pipeline = dataset.eval_pixels()
    assert len(pixels) == 3 and pixels.sample_ids == dataset.sample_ids
    for i in range(3):
        image, label = pixels[i]
        assert image.dtype == torch.uint8 and label == dataset[i][1]
        assert torch.equal(pipeline.normalise(image[None])[0], dataset[i][0])
    assert LabelledImageDataset(samples, augment=True).eval_pixels() is None


def test_an_image_edited_after_indexing_is_refused_when_decoded(tmp_path: Path) -> None:
    """Features are keyed by the indexed sha256: an image changed since then must not be used under it."""
    import hashlib

    from stage1_core.data.datasets import ImageChangedError, LabelledImageDataset, Sample

    path = _jpeg(tmp_path / "a.jpg")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sample = Sample("a.jpg", path, 1, "natix", 2, sha256=digest)
    dataset = LabelledImageDataset([sample])
    pixels, _ = dataset.eval_pixels()
    dataset[0], pixels[0]  # unchanged: decodes
    _jpeg(path, color=(10, 220, 40))  # edited in place, same name
    for reader in (dataset, pixels):
        with pytest.raises(ImageChangedError, match="changed since it was indexed") as info:
            reader[0]
        assert str(path) in str(info.value) and digest in str(info.value)


def test_read_dataset_index_carries_each_images_hash(tmp_path: Path) -> None:
    from stage1_core.steps.context import Layout
    from stage1_core.steps.data import INDEX_FILE, read_dataset_index

    layout = Layout(tmp_path)
    (layout.dir("dataset_index") / INDEX_FILE).write_text(
        "id,path,label,source,line,origin,sha256\n" f"a.jpg,{tmp_path / 'a.jpg'},1,natix,2,train,{'ab' * 32}\n")
    index = read_dataset_index(layout)
    assert index.by_id["a.jpg"].sha256 == "ab" * 32


def test_dataset_index_identity_is_the_images_not_where_they_lie(tmp_path: Path) -> None:
    """A project moved to another directory keeps its index id; a changed label does not."""
    import shutil

    from stage1_core.config import Stage1ProConfig
    from stage1_core.steps.context import Layout
    from stage1_core.steps.data import build_dataset_index

    config = Stage1ProConfig(data_source="synthetic", synthetic_n_train=12, synthetic_n_val=30)
    first = Layout(tmp_path / "a")
    id_here = build_dataset_index(config, first).record.id
    shutil.copytree(first.synthetic_dir, Layout(tmp_path / "b").synthetic_dir)
    moved = build_dataset_index(config, Layout(tmp_path / "b"))
    assert moved.record.id == id_here
    assert str(tmp_path / "b") in (Layout(tmp_path / "b").path("dataset_index") / "dataset_index.csv").read_text()
    labels = Layout(tmp_path / "b").synthetic_dir / "train_labels.csv"
    lines = labels.read_text().splitlines()
    name, label = lines[-1].rsplit(",", 1)
    lines[-1] = f"{name},{1 - int(label)}"
    labels.write_text("\n".join(lines) + "\n")
    assert build_dataset_index(config, Layout(tmp_path / "b")).record.id != id_here
