"""Datasets of challenge views: each image as the subnet would send it, then the deployment transform.

One view of one image is fixed by ``(seed, image sha256, view index, level)``
(:func:`stage1_core.data.challenge.challenge_view`), so a view's pixels never depend on which
worker or thread made them, and a feature store keyed by the view text is content-addressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from stage1_core.data.challenge import challenge_view, describe_pipeline
from stage1_core.data.datasets import Sample, load_rgb
from stage1_core.data.transforms import build_deploy_transform, describe_transform, eval_pipeline


def view_description(seed: int, view: int, level: int | None) -> str:
    """The transform text of one set of views: pipeline (with its version) -> deployment transform."""
    return f"{describe_pipeline(seed, [view], level)} -> {describe_transform(build_deploy_transform())}"


class ChallengeViewDataset(Dataset):
    """``(normalised pixels, label)`` of view ``view`` of each sample (``level`` None: the mixture)."""

    def __init__(self, samples: Sequence[Sample], shas: Sequence[str], seed: int, view: int = 0,
                 level: int | None = None) -> None:
        self.samples = list(samples)
        self.shas = list(shas)
        if len(self.shas) != len(self.samples):
            raise ValueError(f"{len(self.shas)} content hashes for {len(self.samples)} samples")
        self.seed, self.view, self.level = int(seed), int(view), level
        self.transform = build_deploy_transform()
        self.pipeline = eval_pipeline(self.transform)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int):
        """The decoded 224 x 224 challenge image (PIL) of sample ``index`` and its draw."""
        return challenge_view(load_rgb(self.samples[index].path), self.seed, self.shas[index], self.view, self.level)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.image(index)[0]), self.samples[index].label

    def eval_pixels(self) -> tuple["_ChallengePixels", Any]:
        """Same contract as :meth:`LabelledImageDataset.eval_pixels`: uint8 pixels, batch normalisation."""
        return _ChallengePixels(self), self.pipeline

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


class _ChallengePixels(Dataset):
    def __init__(self, parent: ChallengeViewDataset) -> None:
        self.parent = parent

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.parent.pipeline.pixels(self.parent.image(index)[0]), self.parent.samples[index].label


class MixedViewDataset(Dataset):
    """Training images for fine-tuning through the backbone: the clean view or one of K challenge views.

    Each access draws the view from torch's random stream (seeded per DataLoader worker by the
    loader's generator): index 0 is ``clean_transform`` (the training augmentation), 1..K the
    challenge views cached-training uses too (fixed per image and view, so both training modes see
    the same K views).
    """

    def __init__(self, samples: Sequence[Sample], shas: Sequence[str], seed: int, views: int, clean_transform: Any) -> None:
        self.samples, self.shas = list(samples), list(shas)
        if len(self.shas) != len(self.samples):
            raise ValueError(f"{len(self.shas)} content hashes for {len(self.samples)} samples")
        self.seed, self.views = int(seed), int(views)
        self.clean_transform = clean_transform
        self.transform = build_deploy_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = load_rgb(sample.path)
        view = int(torch.randint(self.views + 1, (1,)).item())
        if view == 0:
            return self.clean_transform(image), sample.label
        return self.transform(challenge_view(image, self.seed, self.shas[index], view)[0]), sample.label

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]
