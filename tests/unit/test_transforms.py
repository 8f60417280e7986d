"""Training / evaluation transforms and their stable description."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from stage1_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResizedCenterCrop,
    build_eval_transform,
    build_reference_eval_transform,
    build_train_transform,
    describe_transform,
)


def _steps(transform: v2.Compose) -> dict[type, v2.Transform]:
    return {type(t): t for t in transform.transforms}


def _image(width: int = 333, height: int = 250, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_aggressive_recipe() -> None:
    steps = _steps(build_train_transform("aggressive"))
    crop = steps[v2.RandomResizedCrop]
    assert crop.size == (224, 224) and crop.scale == (0.7, 1.0) and crop.ratio == (0.7, 1.4)
    assert crop.interpolation == v2.InterpolationMode.BICUBIC
    assert steps[v2.RandomHorizontalFlip].p == 0.5
    jitter = steps[v2.ColorJitter]
    assert jitter.brightness == (0.8, 1.2) and jitter.contrast == (0.8, 1.2)
    assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
    erasing = steps[v2.RandomErasing]
    assert erasing.p == 0.4 and erasing.scale == (0.02, 0.4)


def test_moderate_is_the_baseline_recipe() -> None:
    steps = _steps(build_train_transform("moderate"))
    crop = steps[v2.RandomResizedCrop]
    assert crop.scale == (0.8, 1.0) and crop.ratio == (0.75, 1.33)
    assert v2.ColorJitter not in steps
    erasing = steps[v2.RandomErasing]
    assert erasing.p == 0.25 and erasing.scale == (0.02, 0.33) and erasing.ratio == (0.3, 3.3)


def test_light_is_the_evaluation_view_or_its_mirror_image() -> None:
    image = _image()
    reference = build_eval_transform()(image)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = build_train_transform("light")(image)
        mirrored = torch.equal(out, reference.flip(-1))
        assert torch.equal(out, reference) or mirrored
        seen.add(mirrored)
    assert seen == {True, False}


def test_erasing_runs_after_normalisation() -> None:
    kinds = [type(t) for t in build_train_transform("aggressive").transforms]
    assert kinds.index(v2.RandomErasing) > kinds.index(v2.Normalize) > kinds.index(v2.ToDtype)


def test_eval_transform_resizes_bicubic_and_centre_crops() -> None:
    steps = _steps(build_eval_transform())
    resize = steps[ResizedCenterCrop]
    assert resize.size == (256,) and resize.interpolation == v2.InterpolationMode.BICUBIC
    assert resize.crop_size == (224, 224)
    out = build_eval_transform()(_image())
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, build_eval_transform()(_image()))


def test_eval_transform_matches_manual_pipeline() -> None:
    image = _image(300, 200, seed=1)
    resized = image.resize((384, 256), Image.BICUBIC)  # shorter side 200 -> 256
    left, top = (384 - 224) // 2, (256 - 224) // 2
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    out = build_eval_transform()(image)
    # torchvision's antialiased bicubic and PIL's differ slightly at the pixel level.
    assert (out - expected).abs().mean() < 0.05


@pytest.mark.parametrize("kind", ["aggressive", "moderate"])
def test_train_transform_output_and_randomness(kind: str) -> None:
    transform = build_train_transform(kind)
    torch.manual_seed(0)
    a = transform(_image())
    b = transform(_image())
    assert a.shape == b.shape == (3, 224, 224) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(a, transform(_image()))


def test_custom_size_and_normalisation() -> None:
    out = build_eval_transform(image_size=112, resize=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(
        Image.new("RGB", (200, 150), (255, 255, 255))
    )
    assert out.shape == (3, 112, 112) and torch.allclose(out, torch.ones_like(out))
    assert build_train_transform("moderate", image_size=96)(_image()).shape == (3, 96, 96)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="aggressive, moderate"):
        build_train_transform("wild")
    with pytest.raises(ValueError, match="resize"):
        build_eval_transform(image_size=224, resize=200)


def test_describe_transform_is_stable_and_discriminating() -> None:
    text = describe_transform(build_eval_transform())
    assert text == (
        "Compose[ResizedCenterCrop(antialias=True, crop_size=(224, 224), interpolation=InterpolationMode.BICUBIC, "
        "size=(256,)); ToImage(); ToDtype(dtype=torch.float32, scale=True); "
        "Normalize(inplace=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]"
    )
    assert describe_transform(build_reference_eval_transform()) == (
        "Compose[Resize(antialias=True, interpolation=InterpolationMode.BICUBIC, max_size=None, size=(256,)); "
        "CenterCrop(size=(224, 224)); ToImage(); ToDtype(dtype=torch.float32, scale=True); "
        "Normalize(inplace=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]"
    )
    assert describe_transform(build_eval_transform()) == text
    variants = {
        describe_transform(build_eval_transform(resize=288)),
        describe_transform(build_eval_transform(mean=(0.5, 0.5, 0.5))),
        describe_transform(build_train_transform("aggressive")),
        describe_transform(build_train_transform("moderate")),
        text,
    }
    assert len(variants) == 5
    assert "0x" not in "".join(variants)  # no object addresses


def test_describe_transform_nested_and_plain_callables() -> None:
    nested = v2.Compose([v2.RandomApply([v2.RandomHorizontalFlip(p=1.0)], p=0.3), v2.Lambda(lambda x: x)])
    text = describe_transform(nested)
    assert text.startswith("Compose[RandomApply(p=0.3)[RandomHorizontalFlip(p=1.0)]; Lambda(")

    def identity(image):
        return image

    assert describe_transform(identity) == f"{__name__}.test_describe_transform_nested_and_plain_callables.<locals>.identity"


# ----- the split evaluation path (uint8 pixels per image, normalisation per batch) ----------

from stage1_core.data.transforms import eval_pipeline  # noqa: E402


@pytest.mark.parametrize("build", [build_eval_transform, build_reference_eval_transform])
@pytest.mark.parametrize("size", [(333, 250), (100, 500), (256, 256), (224, 300), (1000, 90), (257, 1931)])
def test_eval_pipeline_equals_its_transform_bit_for_bit(size, build) -> None:
    transform = build()
    pipeline = eval_pipeline(transform)
    assert pipeline is not None
    images = [_image(*size, seed=s) for s in range(3)]
    pixels = torch.stack([pipeline.pixels(im) for im in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 224, 224)
    reference = torch.stack([transform(im) for im in images])
    assert torch.equal(pipeline.normalise(pixels), reference)


def test_eval_pipeline_keeps_the_transform_parameters() -> None:
    transform = build_eval_transform(image_size=160, resize=192, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    pipeline = eval_pipeline(transform)
    assert (pipeline.resize, pipeline.crop) == (192, (160, 160))
    image = _image(301, 222)
    assert torch.equal(pipeline.normalise(pipeline.pixels(image)[None])[0], transform(image))
    with pytest.raises(TypeError, match="uint8"):
        pipeline.normalise(torch.zeros(1, 3, 4, 4))


def test_only_evaluation_transforms_get_the_split_path() -> None:
    assert eval_pipeline(build_train_transform("moderate")) is None
    assert eval_pipeline(build_train_transform("light")) is None
    assert eval_pipeline(lambda image: image) is None
    steps = build_eval_transform().transforms
    assert eval_pipeline(v2.Compose([*steps, v2.RandomHorizontalFlip()])) is None
    assert eval_pipeline(v2.Compose([*steps[:2], v2.ToDtype(torch.float16, scale=True), steps[3]])) is None
    reference = build_reference_eval_transform().transforms
    assert eval_pipeline(v2.Compose([v2.Resize(256, max_size=400), *reference[1:]])) is None
    assert eval_pipeline(v2.Compose([reference[0], *reference[2:]])) is None  # Resize without CenterCrop


# ----- ResizedCenterCrop: one resampling of the crop's box vs torchvision's Resize + CenterCrop ----

#: Stated tolerance on photo-like images (uint8 levels), and the share of values allowed to differ.
PHOTO_MAX_LEVELS = 2
PHOTO_DIFFERING_SHARE = 0.005


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like test image (gradients and soft blobs), unlike white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        value = rng.uniform(0, 1) * x + rng.uniform(0, 1) * y
        for _ in range(4):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            value += rng.uniform(-1, 1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)
        channels.append(value)
    array = np.stack(channels, -1)
    array = (array - array.min()) / (np.ptp(array) + 1e-9) * 255
    return Image.fromarray(array.round().astype(np.uint8))


@pytest.mark.parametrize("size", [(333, 250), (261, 175), (400, 300), (300, 400), (1920, 1080), (257, 1000), (640, 256)])
def test_resized_center_crop_matches_resize_then_center_crop_within_tolerance(size) -> None:
    fast, reference = ResizedCenterCrop(256, 224), v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC),
                                                               v2.CenterCrop(224)])
    for seed in range(3):
        image = _photo(*size, seed=seed)
        a = np.asarray(fast(image), dtype=np.int16)
        b = np.asarray(reference(image), dtype=np.int16)
        assert a.shape == b.shape == (224, 224, 3)
        difference = np.abs(a - b)
        assert difference.max() <= PHOTO_MAX_LEVELS, (size, seed, difference.max())
        assert (difference > 0).mean() <= PHOTO_DIFFERING_SHARE, (size, seed, (difference > 0).mean())


def test_resized_center_crop_on_the_embedded_default_images_is_within_tolerance(tmp_path) -> None:
    from stage1_core.data.datasets import load_rgb
    from stage1_core.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path, n_train=60, n_val=1, seed=3, progress=False)
    fast, reference = ResizedCenterCrop(256, 224), v2.Compose([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC),
                                                               v2.CenterCrop(224)])
    paths = sorted((tmp_path / "train").glob("*.jpg"))
    assert len(paths) >= 50
    differing = []
    for path in paths:
        image = load_rgb(path)
        difference = np.abs(np.asarray(fast(image), dtype=np.int16) - np.asarray(reference(image), dtype=np.int16))
        assert difference.max() <= PHOTO_MAX_LEVELS, (path.name, difference.max())
        differing.append((difference > 0).mean())
    assert np.mean(differing) <= PHOTO_DIFFERING_SHARE


def test_resized_center_crop_geometry_and_tensor_path_are_torchvision_s() -> None:
    step = ResizedCenterCrop(256, 224)
    for width, height in [(333, 250), (250, 333), (257, 1000), (224, 224), (1000, 257)]:
        resized = v2.Resize(256)(_image(width, height))
        (out_w, out_h), (left, top) = step.geometry(width, height)
        assert (out_w, out_h) == resized.size
        assert (left, top) == (int(round((out_w - 224) / 2.0)), int(round((out_h - 224) / 2.0)))
    tensor = torch.from_numpy(np.array(_image(301, 222))).permute(2, 0, 1).contiguous()
    reference = v2.CenterCrop(224)(v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC)(tensor))
    assert torch.equal(step(tensor), reference)


def test_resized_center_crop_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError, match="smaller than crop_size"):
        ResizedCenterCrop(200, 224)
    with pytest.raises(ValueError, match="antialias"):
        ResizedCenterCrop(256, 224, antialias=False)
    with pytest.raises(ValueError, match="not supported"):
        ResizedCenterCrop(256, 224, interpolation=v2.InterpolationMode.NEAREST)
    with pytest.raises(ValueError, match="crop_size"):
        ResizedCenterCrop(256, (224, 224, 3))
