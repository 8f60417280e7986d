"""The StreetVision challenge pipeline against the facts of METHODS section 8."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from stage1_core.data import challenge as ch
from stage1_core.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, SquareCropResize, build_deploy_transform, describe_transform, eval_pipeline,
)


def _noise_image(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_pipeline_id_carries_a_version():
    assert ch.PIPELINE_ID == f"streetvision-v{ch.PIPELINE_VERSION}"
    assert ch.PIPELINE_ID in ch.describe_pipeline(7, [0])
    assert ch.describe_pipeline(7, [0]) != ch.describe_pipeline(8, [0])


def test_level0_is_the_centre_square_resized_to_224():
    image = _noise_image(320, 240)
    draw = ch.draw_challenge(np.random.default_rng(0), 320, 240, level=0)
    out = np.asarray(ch.apply_challenge(image, draw))
    expected = np.asarray(image.crop((40, 0, 280, 240)).resize((224, 224), Image.Resampling.BILINEAR))
    assert out.shape == (224, 224, 3)
    # tensor / 255 * 255 truncated to bytes keeps every grey level
    np.testing.assert_array_equal(out, expected)


def test_rotation_fills_black_corners_with_nearest_interpolation():
    image = Image.new("RGB", (224, 224), (200, 100, 50))
    draw = ch.ChallengeDraw(level=1, angle=20.0, crop=(0, 0, 224, 224))
    out = np.asarray(ch.apply_challenge(image, draw))
    assert out[0, 0].tolist() == [0, 0, 0] and out[-1, -1].tolist() == [0, 0, 0]
    assert out[112, 112].tolist() == [200, 100, 50]
    # nearest: no blended value at the edge of the rotated frame
    colours = {tuple(p) for p in out.reshape(-1, 3).tolist()}
    assert colours == {(0, 0, 0), (200, 100, 50)}


def test_rotation_angle_and_crop_area_stay_in_range():
    for i in range(400):
        rng = np.random.default_rng(i)
        draw = ch.draw_challenge(rng, 320, 240, level=1)
        assert -20.0 <= draw.angle <= 20.0
        top, left, h, w = draw.crop
        assert h == w and 0 <= top <= 240 - h and 0 <= left <= 320 - w
        fraction = h * w / (320 * 240)
        assert 0.2 - 0.01 <= fraction <= 1.0
    angles = [ch.draw_challenge(np.random.default_rng(i), 64, 64, level=1).angle for i in range(400)]
    assert min(angles) < -18 and max(angles) > 18


def test_crop_falls_back_to_the_centre_square():
    class Never:  # every area fraction too large for the image
        def uniform(self, lo, hi):
            return 1.0

    assert ch.random_square_crop(Never(), 320, 240) == (0, 40, 240, 240)


@pytest.mark.parametrize("level,allowed", [(2, (0, 1)), (3, (0, 1, 2))])
def test_distortion_levels_per_challenge_level(level, allowed):
    seen: dict[str, set[int]] = {}
    for i in range(200):
        draw = ch.draw_challenge(np.random.default_rng(i), 100, 100, level=level)
        assert [n for n, _ in draw.distortions] == [n for n, _ in ch.LEVEL_DISTORTIONS[level]]
        for name, value in draw.distortions:
            seen.setdefault(name, set()).add(value)
    assert all(values == set(allowed) for values in seen.values())


def test_level_frequencies_are_a_quarter_each():
    levels = np.array([ch.draw_challenge(ch.view_rng(3, f"{i:064x}", 0), 64, 64).level for i in range(4000)])
    freq = np.bincount(levels, minlength=4) / len(levels)
    sd = math.sqrt(0.25 * 0.75 / len(levels))
    assert np.all(np.abs(freq - 0.25) < 4 * sd), freq


def test_colour_saturation_scales_chroma_keeps_luma():
    pixels = np.array([[[200, 100, 50], [90, 90, 90]]], dtype=np.uint8)
    for factor in (0.4, 0.3):
        out = ch.colour_saturation(pixels, factor).astype(float)
        luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
        expected = luma + factor * (np.array([200, 100, 50]) - luma)
        assert np.all(np.abs(out[0, 0] - expected) <= 1.0)
        assert out[0, 1].tolist() == [90, 90, 90]
    assert ch.DISTORTION_PARAMETERS["CS"] == (0.4, 0.3)


def test_colour_contrast_multiplies_and_truncates():
    pixels = np.full((2, 2, 3), 101, dtype=np.uint8)
    assert ch.apply_distortion(pixels, "CC", 1)[0, 0, 0] == int(101 * 0.85)
    assert ch.apply_distortion(pixels, "CC", 2)[0, 0, 0] == int(101 * 0.725)
    assert ch.apply_distortion(pixels, "CC", 0) is pixels


def test_down_up_scaling_by_2_and_3():
    checker = ((np.indices((24, 24)).sum(0) % 2) * 255).astype(np.uint8)
    pixels = np.repeat(checker[..., None], 3, axis=2)
    out = ch.apply_distortion(pixels, "JPEG", 1)
    # by 2 with half-pixel centres each small pixel is the mean of a 2 x 2 block: the checkerboard is gone
    assert out.shape == pixels.shape and np.all(np.abs(out.astype(float) - 127.5) <= 1)
    # by 3 without antialiasing each small pixel is the source pixel 3 i + 1 (OpenCV's INTER_LINEAR too)
    out = ch.apply_distortion(pixels, "JPEG", 2)
    np.testing.assert_array_equal(out, ch._bilinear(pixels[1::3, 1::3], (24, 24)))
    flat = np.full((30, 30, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(ch.down_up_scale(flat, 3), flat)


def test_gaussian_noise_variance_in_scaled_ycbcr():
    grey = np.full((256, 256, 3), 128, dtype=np.uint8)
    for level, variance in ((1, 0.001), (2, 0.002)):
        out = ch.apply_distortion(grey, "GNC", level, np.random.default_rng(0)).astype(float)
        luma = out @ np.array([0.299, 0.587, 0.114])
        expected = math.sqrt(variance) * 255 * 255 / 219
        assert abs(luma.std() - expected) / expected < 0.05
        assert abs(luma.mean() - 127.5) < 1.0  # truncation moves the mean down by about half a level


def test_gaussian_blur_kernel_and_sigma():
    for level, kernel in ((1, 7), (2, 9)):
        impulse = np.zeros((21, 21, 3), dtype=np.uint8)
        impulse[10, 10] = 255
        out = ch.apply_distortion(impulse, "GB", level)[..., 0].astype(float)
        half = kernel // 2
        x = np.arange(-half, half + 1)
        k = np.exp(-x**2 / (2 * (kernel / 6.0) ** 2))
        k /= k.sum()
        expected = np.round(255 * np.outer(k, k))
        np.testing.assert_allclose(out[10 - half:11 + half, 10 - half:11 + half], expected, atol=1)
        outside = out.copy()
        outside[10 - half:11 + half, 10 - half:11 + half] = 0
        assert outside.max() == 0


def test_final_jpeg_round_trip_at_quality_75():
    image = _noise_image(224, 224)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    out = np.asarray(ch.jpeg_round_trip(image))
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, np.asarray(image))
    view, draw = ch.challenge_view(_noise_image(), 1, "ab", 0)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(ch.jpeg_round_trip(ch.apply_challenge(_noise_image(), draw))))
    assert view.size == (224, 224)


def test_views_are_deterministic_and_order_free():
    image = _noise_image()
    forward = [np.asarray(ch.challenge_view(image, 5, "aa", v)[0]) for v in range(4)]
    backward = [np.asarray(ch.challenge_view(image, 5, "aa", v)[0]) for v in reversed(range(4))][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    draws = [ch.draw_challenge(ch.view_rng(5, "aa", v), 320, 240) for v in range(12)]
    random_draws = [repr(d) for d in draws if d.level != 0]  # level 0 has no random choice
    assert len(random_draws) >= 5 and len(set(random_draws)) == len(random_draws)
    assert repr(ch.draw_challenge(ch.view_rng(5, "aa", 0), 320, 240)) != repr(ch.draw_challenge(ch.view_rng(6, "aa", 0), 320, 240))
    assert ch.challenge_view(image, 5, "aa", 0, level=3)[1].level == 3


def test_deploy_transform_passes_224_whole_and_crops_larger_inputs():
    transform = build_deploy_transform()
    image = _noise_image(224, 224)
    expected = F.normalize(F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(transform(image), expected, rtol=0, atol=0)
    big = _noise_image(320, 240)
    level0 = ch.square_crop_resize(big)
    torch.testing.assert_close(transform(big), transform(level0), rtol=0, atol=0)
    pipeline = eval_pipeline(transform)
    assert pipeline is not None and pipeline.crop == (224, 224)
    batch = pipeline.normalise(torch.stack([pipeline.pixels(image)]))
    torch.testing.assert_close(batch[0], expected, rtol=0, atol=0)
    assert describe_transform(transform).startswith("Compose[SquareCropResize(")
    with pytest.raises(TypeError):
        SquareCropResize()(torch.zeros(3, 8, 8))


def test_deploy_transform_is_rebuilt_from_its_description():
    from stage1_core.bundle.load import eval_transform_from_description

    text = describe_transform(build_deploy_transform())
    assert describe_transform(eval_transform_from_description(text)) == text
