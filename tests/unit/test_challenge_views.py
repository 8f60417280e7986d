"""Datasets of challenge views: pixels as the subnet sends them, content-addressed features."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from stage1_core.data.challenge import challenge_view
from stage1_core.data.challenge_views import ChallengeViewDataset, MixedViewDataset, view_description
from stage1_core.data.datasets import Sample
from stage1_core.data.transforms import build_deploy_transform


def _samples(tmp_path, n=6):
    rng = np.random.default_rng(0)
    samples, shas = [], []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (120 + 8 * i, 160, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(f"s{i}", path, i % 2, "natix", i + 2))
        shas.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return samples, shas


class MeanBackbone:
    """A stand-in backbone: the per-channel mean of the pixels (deterministic, cheap)."""

    hidden_size = 3
    device = torch.device("cpu")
    dtype = torch.float32

    def fingerprint(self) -> str:
        return "cd" * 32

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.mean(dim=(2, 3))


def test_dataset_items_are_the_challenge_views_through_the_deploy_transform(tmp_path):
    samples, shas = _samples(tmp_path)
    data = ChallengeViewDataset(samples, shas, seed=3, view=0)
    transform = build_deploy_transform()
    pixels, pipeline = data.eval_pixels()
    for i in range(len(samples)):
        expected = transform(challenge_view(Image.open(samples[i].path), 3, shas[i], 0)[0])
        x, label = data[i]
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        torch.testing.assert_close(pipeline.normalise(pixels[i][0][None])[0], expected, rtol=0, atol=0)
        assert label == samples[i].label
    assert view_description(3, 0, None) != view_description(3, 1, None) != view_description(4, 0, None)
    assert "streetvision-v" in view_description(3, 0, 2)


def test_features_of_views_are_content_addressed(tmp_path):
    from stage1_core.features import cache_key, extract_split_features

    samples, shas = _samples(tmp_path)
    text = view_description(0, 0, None)
    store = tmp_path / "store" / cache_key("cd" * 32, text, {"val_calib": shas})
    datasets = {"val_calib": ChallengeViewDataset(samples, shas, 0, 0)}
    first = extract_split_features(MeanBackbone(), datasets, store, text, sample_ids={"val_calib": shas},
                                   batch_size=4, progress=False, store_labels=False, num_workers=2)
    again = extract_split_features(MeanBackbone(), datasets, store, text, sample_ids={"val_calib": shas},
                                   batch_size=4, progress=False, store_labels=False, num_workers=1)
    assert first.forward_passes == 2 and again.forward_passes == 0


def test_mixed_views_draw_clean_or_a_cached_view(tmp_path):
    samples, shas = _samples(tmp_path, 2)
    clean = build_deploy_transform()
    data = MixedViewDataset(samples, shas, seed=0, views=2, clean_transform=lambda img: torch.full((3, 224, 224), -9.0))
    views = {1: clean(challenge_view(Image.open(samples[0].path), 0, shas[0], 1)[0]),
             2: clean(challenge_view(Image.open(samples[0].path), 0, shas[0], 2)[0])}
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x, _ = data[0]
        if float(x[0, 0, 0]) == -9.0:
            seen.add(0)
        else:
            seen.add(next(v for v, t in views.items() if torch.equal(t, x)))
    assert seen == {0, 1, 2}
