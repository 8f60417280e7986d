"""Ask a running ``stage1 serve`` for the roadwork probability of one image (Python standard library only).

This file is copied as-is into a miner submission (``stage1_client.py``) and is imported by the
miner's own process, whose environment (the subnet pins transformers 4.45) cannot install
stage1-pro: it must never import anything outside the standard library.

    from stage1_client import predict_p_roadwork
    p = predict_p_roadwork("http://127.0.0.1:8000", image_b64, timeout=5.0, fallback=0.5)

``image`` is what the miner holds: a base64 string (as the subnet sends it, with or without a
``data:image/...;base64,`` prefix), the encoded bytes of an image, a file path, or an object with
PIL's ``save(file, format=...)``.

Fallback: the subnet scores an exception or a missing answer as 0, so a miner should always
answer a float. When the service cannot answer (not running, timeout, HTTP error, an answer that
is not a probability), ``predict_p_roadwork`` returns ``fallback`` if one is given (and logs a
warning naming the failure), else raises :class:`ServiceUnavailable`. ``fallback=0.5`` says "no
information"; the class prior (about 0.9 on NATIX val) scores better on average if the service
is down for long; raising lets the caller run another model instead. Choose explicitly.

From a shell: ``python stage1_client.py http://127.0.0.1:8000 image.jpg`` prints the probability.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import sys
import urllib.error
import urllib.request
from typing import Any

__all__ = ["DEFAULT_TIMEOUT_S", "ServiceUnavailable", "predict", "predict_p_roadwork"]

#: Seconds to wait for an answer (the subnet allows 9 s per query: leave time for a fallback).
DEFAULT_TIMEOUT_S = 5.0

logger = logging.getLogger("stage1_client")


class ServiceUnavailable(RuntimeError):
    """The service gave no valid answer (connection, timeout, HTTP error or malformed answer)."""


def _body(image: Any) -> tuple[bytes, str]:
    """The request body and its content type for one image."""
    if isinstance(image, str):
        return json.dumps({"image": image}).encode("ascii"), "application/json"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "application/octet-stream"
    if isinstance(image, os.PathLike):
        with open(image, "rb") as handle:
            return handle.read(), "application/octet-stream"
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the service sees these exact pixels
        return buffer.getvalue(), "image/png"
    raise TypeError(
        f"image must be a base64 str, bytes, a path (os.PathLike) or a PIL image, got {type(image).__name__}"
    )


def predict(url: str, image: Any, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """The service's whole answer for one image (``p_roadwork``, ``exit``, ``label``, ...); raises on any failure."""
    return _post(url, *_body(image), timeout)


def _post(url: str, body: bytes, content_type: str, timeout: float) -> dict:
    request = urllib.request.Request(
        url.rstrip("/") + "/predict", data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode("utf-8", "replace")
        raise ServiceUnavailable(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out
        raise ServiceUnavailable(f"{url}: no answer ({getattr(exc, 'reason', exc)})") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ServiceUnavailable(f"{url}: answer is not JSON: {raw[:200]!r}") from None
    p = answer.get("p_roadwork") if isinstance(answer, dict) else None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ServiceUnavailable(f"{url}: answer holds no probability in [0, 1]: {raw[:200]!r}")
    return answer


def predict_p_roadwork(url: str, image: Any, timeout: float = DEFAULT_TIMEOUT_S,
                       fallback: float | None = None) -> float:
    """P(roadwork) in [0, 1] for ``image`` from the service at ``url``.

    On any failure: ``fallback`` when given (a warning is logged), else :class:`ServiceUnavailable`.
    A bad ``image`` argument (wrong type, unreadable path) is the caller's bug and always raises.
    """
    if fallback is not None and not (isinstance(fallback, (int, float)) and 0.0 <= fallback <= 1.0):
        raise ValueError(f"fallback must be a probability in [0, 1] or None, got {fallback!r}")
    body, content_type = _body(image)
    try:
        return float(_post(url, body, content_type, timeout)["p_roadwork"])
    except ServiceUnavailable as exc:
        if fallback is None:
            raise
        logger.warning("stage1 service failed, answering the fallback %s: %s", fallback, exc)
        return float(fallback)


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python stage1_client.py URL IMAGE_FILE", file=sys.stderr)
        return 2
    url, path = argv
    try:
        with open(path, "rb") as handle:
            image = base64.b64encode(handle.read()).decode("ascii")
        print(json.dumps(predict(url, image)))
    except (OSError, ServiceUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
