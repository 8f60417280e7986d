"""What ``POST /predict`` accepts, turned into decoded RGB images or a 4xx with the reason.

Three request shapes, as a StreetVision miner receives images (base64 JPEG) or a caller holds them:

- raw bytes of one image (``Content-Type: image/*`` or ``application/octet-stream``);
- JSON ``{"image": "<base64>"}`` (a ``data:image/...;base64,`` prefix is accepted);
- JSON ``{"images": ["<base64>", ...]}``, a batch, answered as ``{"results": [...]}`` in order.

Images are decoded exactly as :func:`stage1_core.data.datasets.load_rgb` decodes files (full
decode, EXIF orientation, every mode to RGB), so a served decision equals ``stage1 predict`` on
the same bytes. Every problem is an :class:`InputError` carrying the HTTP status to answer.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image

from stage1_core.data.datasets import to_rgb

__all__ = ["InputError", "Limits", "ParsedRequest", "decode_image", "parse_predict_request"]

#: Content types read as one raw image.
RAW_TYPES = ("application/octet-stream",)
JSON_TYPES = ("application/json",)


class InputError(ValueError):
    """A request the service refuses: ``status`` (4xx) and a reason the caller can act on."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status}: {reason}")


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: body size, images per request, pixels per image."""

    max_bytes: int = 16 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = 40_000_000


@dataclass
class ParsedRequest:
    """Decoded images of one request; ``batch`` when it was ``{"images": [...]}``."""

    images: list[Image.Image]
    batch: bool


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Fully decode ``data`` to an RGB image (as ``load_rgb`` does a file); :class:`InputError` if not."""
    if not data:
        raise InputError(400, f"{what}: empty; send the bytes of a JPEG/PNG/WebP image")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # known from the header, before any pixel is decoded
        if width * height > limits.max_pixels:
            raise InputError(
                413, f"{what}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}; "
                     f"send a smaller image (the subnet's are 224x224)"
            )
        image.load()
        return to_rgb(image)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile bytes make PIL raise anything; the caller gets a 422
        reason = str(exc) or type(exc).__name__
        raise InputError(422, f"{what}: cannot decode the image ({reason}); send a JPEG/PNG/WebP image") from None


def _b64(value: Any, limits: Limits, what: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(400, f"{what}: expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InputError(400, f"{what}: a data URI must be 'data:image/...;base64,<data>'")
    if len(text) * 3 // 4 > limits.max_bytes:
        raise InputError(413, f"{what}: larger than the limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(400, f"{what}: not valid base64 ({exc})") from None


def parse_predict_request(body: bytes, content_type: str | None, limits: Limits) -> ParsedRequest:
    """Decode one ``/predict`` body; :class:`InputError` names every image that is wrong."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if len(body) > limits.max_bytes:
        raise InputError(413, f"request body of {len(body)} bytes exceeds the limit of {limits.max_bytes}")
    if kind.startswith("image/") or kind in RAW_TYPES:
        return ParsedRequest([decode_image(body, limits)], batch=False)
    if kind not in JSON_TYPES:
        raise InputError(
            415, f"unsupported Content-Type {content_type!r}: send image bytes (image/jpeg, image/png, "
                 f"application/octet-stream) or JSON {{\"image\": base64}} / {{\"images\": [base64, ...]}}"
        )
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InputError(400, f"body is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or ("image" in payload) == ("images" in payload):
        raise InputError(400, 'JSON body must be an object with exactly one of "image" (base64) or "images" (list)')
    if "image" in payload:
        return ParsedRequest([decode_image(_b64(payload["image"], limits, "image"), limits)], batch=False)
    values = payload["images"]
    if not isinstance(values, list) or not values:
        raise InputError(400, '"images" must be a non-empty list of base64 strings')
    if len(values) > limits.max_images:
        raise InputError(413, f'"images" holds {len(values)} images; at most {limits.max_images} per request')
    images, problems = [], []
    for index, value in enumerate(values):
        try:
            images.append(decode_image(_b64(value, limits, f"images[{index}]"), limits, f"images[{index}]"))
        except InputError as exc:
            problems.append(exc)
    if problems:
        status = max(p.status for p in problems)
        raise InputError(status, f"{len(problems)} of {len(values)} images refused: " + "; ".join(p.reason for p in problems))
    return ParsedRequest(images, batch=True)
