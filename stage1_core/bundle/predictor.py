"""The one object that turns features or images into exit decisions.

:class:`Stage1Predictor` wraps a head, an :class:`~stage1_core.policies.ExitPolicy` and, for
images, a frozen backbone and its evaluation transform. Evaluation calls
:meth:`Stage1Predictor.decide_features` on cached val_test features; a deploy bundle calls
:meth:`Stage1Predictor.predict` on images, which runs the same head and the same policy after the
backbone. Nothing here holds a threshold: every decision comes from the policy, whose numbers come
from its policy file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from stage1_core.data.datasets import CorruptImageError, load_rgb, to_rgb
from stage1_core.data.loaders import ordered_thread_map
from stage1_core.data.transforms import eval_pipeline
from stage1_core.model.head import HeadOutput
from stage1_core.policies.base import Decisions, ExitPolicy

__all__ = ["FeatureBatch", "ImageInput", "Stage1Predictor", "load_image"]

ImageInput = Union[Image.Image, str, Path]

#: Feature rows pushed through the head at once (the head is small; this only bounds memory).
FEATURE_CHUNK = 8192


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path, decoded exactly as the data layer does.

    :func:`~stage1_core.data.datasets.to_rgb` applies EXIF orientation and converts every mode
    (CMYK, 16-bit, palette, alpha) the way training and evaluation images are converted, so a
    deployed decision sees the pixels the evaluation saw. A file that cannot be decoded (empty,
    truncated, not an image, larger than PIL's decompression-bomb limit) raises ``ValueError``
    naming it; a missing file raises ``FileNotFoundError``.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        return load_rgb(path)
    except CorruptImageError as exc:
        raise ValueError(f"{path}: cannot read the image ({exc.reason}); pass a JPEG/PNG/WebP file") from exc


@dataclass
class FeatureBatch:
    """One batch of :meth:`Stage1Predictor.iter_features`: input positions, their features, failures."""

    indices: list[int]
    features: torch.Tensor
    failures: list[tuple[int, Exception]]


class Stage1Predictor:
    """Head + exit policy (+ backbone and transform for images): features or images in, decisions out.

    ``gate_scores`` handed to the policy are the head's raw gate logits (``HeadOutput.gate``) when
    the head has a gate, else ``None``; a gated policy applies its own calibrator to them.
    """

    def __init__(
        self,
        head: nn.Module,
        policy: ExitPolicy,
        backbone: nn.Module | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        served: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(policy, ExitPolicy):
            raise TypeError(f"policy must be an ExitPolicy, got {type(policy).__name__}")
        self.device = torch.device(device)
        self.head = head.to(self.device)
        self.policy = policy
        self.backbone = backbone
        self.transform = transform
        #: Served-probability calibrator spec (stage1_core.calibration.served); None serves the policy's p.
        self.served = served

    # ----- features ----------------------------------------------------------------------

    def _features_tensor(self, features: Any) -> torch.Tensor:
        tensor = torch.as_tensor(features)
        if tensor.ndim != 2:
            raise ValueError(f"features must have shape [N, hidden], got {tuple(tensor.shape)}")
        expected = getattr(self.head, "hidden_size", None)
        if expected is not None and tensor.shape[1] != expected:
            raise ValueError(
                f"features have {tensor.shape[1]} dimensions but the head expects {expected} "
                f"(features from another backbone?)"
            )
        if not torch.is_floating_point(tensor):
            raise ValueError(f"features must be floating point, got {tensor.dtype}")
        return tensor

    def head_outputs_from_features(self, features: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Class logits ``[N, 2]`` and gate logits ``[N]`` (None without a gate), head in eval mode."""
        tensor = self._features_tensor(features)
        dtype = next(self.head.parameters()).dtype
        logits, gates = [], []
        was_training = self.head.training
        self.head.eval()
        try:
            with torch.inference_mode():
                for start in range(0, tensor.shape[0], FEATURE_CHUNK):
                    chunk = tensor[start : start + FEATURE_CHUNK].to(self.device, dtype)
                    out = self.head(chunk)
                    if isinstance(out, HeadOutput):
                        logits.append(out.logits.float().cpu())
                        gates.append(out.gate.float().cpu())
                    else:
                        logits.append(out.float().cpu())
        finally:
            self.head.train(was_training)
        all_logits = torch.cat(logits).numpy() if logits else np.zeros((0, 2), dtype=np.float32)
        all_gates = torch.cat(gates).numpy() if gates else None
        return all_logits, all_gates

    def predict_logits_from_features(self, features: Any) -> np.ndarray:
        """Class logits ``[N, 2]`` for CLS features ``[N, hidden]``."""
        return self.head_outputs_from_features(features)[0]

    @staticmethod
    def probabilities(logits: np.ndarray) -> np.ndarray:
        """Softmax of ``logits`` in float64 (the probabilities every policy decides on)."""
        return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()

    def predict_proba_from_features(self, features: Any) -> np.ndarray:
        """Softmax probabilities ``[N, 2]`` for CLS features."""
        return self.probabilities(self.predict_logits_from_features(features))

    def decide_features(self, features: Any) -> Decisions:
        """Exit decisions for CLS features ``[N, hidden]``: head, softmax, then the policy."""
        logits, gates = self.head_outputs_from_features(features)
        probs = self.probabilities(logits)
        decisions = self.policy.decide(probs, gate_scores=gates)
        return self.serve(decisions, probs)

    def serve(self, decisions: Decisions, probs: np.ndarray) -> Decisions:
        """``decisions`` with ``p_roadwork`` replaced by the served (deployment-prior) probability, if any."""
        if self.served is None:
            return decisions
        import dataclasses

        from stage1_core.calibration.served import served_probability

        return dataclasses.replace(decisions, p_roadwork=served_probability(self.served, probs))

    # ----- images ------------------------------------------------------------------------

    def _image_path(self) -> tuple[Callable[[ImageInput], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """``(per-image function, per-batch function)`` of the image path.

        With the evaluation transform (what a bundle records) the per-image part decodes,
        resizes and crops to ``uint8`` and the batch part normalises on the device, bit-identical
        to applying the transform image by image; any other transform runs image by image.
        """
        if self.backbone is None or self.transform is None:
            raise ValueError(
                "this predictor has no backbone/transform, so it can only decide on features; "
                "build it with backbone=... and transform=... (Stage1Bundle.load does) to predict on images"
            )
        pipeline = eval_pipeline(self.transform)
        if pipeline is not None:
            return (lambda image: pipeline.pixels(load_image(image))), pipeline.normalise
        transform = self.transform
        return (lambda image: transform(load_image(image))), (lambda batch: batch)

    def iter_features(
        self, images: Iterable[ImageInput], batch_size: int = 32, num_workers: int | None = None
    ) -> Iterator[FeatureBatch]:
        """CLS features batch by batch, images decoded ahead in ``num_workers`` threads.

        Each :class:`FeatureBatch` covers up to ``batch_size`` consecutive inputs: the positions
        and features of those that decoded, and ``(position, error)`` of those that did not
        (``FileNotFoundError``, or ``ValueError`` naming the file). ``images`` may be any
        iterable (a stream of paths); at most a few batches are decoded ahead.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        per_image, per_batch = self._image_path()
        hidden = int(getattr(self.head, "hidden_size", 0))
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        decoded = ordered_thread_map(per_image, images, num_workers, in_flight=2 * batch_size)
        position = 0
        while True:
            chunk = list(itertools.islice(decoded, batch_size))
            if not chunk:
                return
            indices, pixels, failures = [], [], []
            for offset, (_, value, error) in enumerate(chunk):
                if error is not None:
                    if not isinstance(error, (FileNotFoundError, ValueError)):
                        raise error
                    failures.append((position + offset, error))
                else:
                    indices.append(position + offset)
                    pixels.append(value)
            position += len(chunk)
            if pixels:
                batch = torch.stack(pixels)
                if pin:
                    batch = batch.pin_memory()
                batch = per_batch(batch.to(self.device, non_blocking=pin))
                features = self._backbone_features(batch).float().cpu()
            else:
                features = torch.zeros((0, hidden), dtype=torch.float32)
            yield FeatureBatch(indices, features, failures)

    def extract_features(
        self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None
    ) -> torch.Tensor:
        """CLS features ``[N, hidden]`` of ``images`` (batched, decoded in parallel threads).

        The first image that cannot be read raises (``FileNotFoundError`` or ``ValueError``
        naming the file); use :meth:`iter_predict` to decide the readable ones and report the rest.
        """
        feats = []
        for batch in self.iter_features(images, batch_size=batch_size, num_workers=num_workers):
            if batch.failures:
                raise batch.failures[0][1]
            feats.append(batch.features)
        if not feats:
            return torch.zeros((0, int(getattr(self.head, "hidden_size", 0))), dtype=torch.float32)
        return torch.cat(feats)

    def _backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        extract = getattr(self.backbone, "extract", None)
        if extract is not None:
            return extract(pixel_values.to(self.device))
        self.backbone.eval()
        with torch.inference_mode():
            return self.backbone(pixel_values.to(self.device))

    def decide_images(
        self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None
    ) -> Decisions:
        """Exit decisions for images (paths or PIL images)."""
        return self.decide_features(self.extract_features(images, batch_size=batch_size, num_workers=num_workers))

    def predict(
        self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int | None = None
    ) -> list[dict[str, Any]]:
        """One dict per image: ``exit`` (bool), ``label`` (int when exited, else None),
        ``p_roadwork`` (float, softmax probability of class 1) and ``prediction_set`` (list of int:
        ``[label]`` when exited, ``[0, 1]`` when deferred to Stage 2)."""
        return self.decide_images(images, batch_size=batch_size, num_workers=num_workers).to_records()

    def iter_predict(
        self, images: Iterable[ImageInput], batch_size: int = 32, num_workers: int | None = None
    ) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
        """``(position, record)`` per input in input order, batch by batch (a stream in, a stream out).

        ``record`` is what :meth:`predict` returns for that image, or the exception that kept it
        from being read (``FileNotFoundError``, or ``ValueError`` naming the file).
        """
        for batch in self.iter_features(images, batch_size=batch_size, num_workers=num_workers):
            records = self.decide_features(batch.features).to_records() if batch.indices else []
            results: dict[int, dict[str, Any] | Exception] = dict(zip(batch.indices, records))
            results.update(batch.failures)
            yield from sorted(results.items())
