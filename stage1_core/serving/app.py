"""The prediction service: a FastAPI app around one :class:`ModelHolder` and one :class:`MicroBatcher`.

Endpoints:

- ``POST /predict``: one image (raw bytes, or JSON ``{"image": base64}``) answers one object;
  a batch (``{"images": [base64, ...]}``) answers ``{"results": [...]}``. Each answer holds
  ``p_roadwork`` (always a finite float in [0, 1]), ``exit``, ``label`` (None when deferred),
  ``prediction_set``, ``bundle_id``, ``batch_size`` (images decided in the same forward pass)
  and ``elapsed_ms`` (server time from receipt to answer).
- ``GET /health``: the serving bundle (id, phase, policy, device, backbone) and the batcher's queue.
- ``GET /metrics``: Prometheus text (requests by endpoint and status, predict latency histogram,
  decisions by exit, errors by reason, batch sizes, reloads, the serving bundle).
- ``POST /reload``: load a bundle (JSON ``{"id": ..., "bundle": ...}``, both optional) through the
  same verified, pinned load; 409 with the reasons if refused, the old bundle still serving.

Bad input is a 4xx with ``{"error": reason}``; a failure of the model is a 500 that names it and
is counted; neither stops the service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from stage1_core.serving.batcher import BatcherBusy, BatcherStopped, MicroBatcher
from stage1_core.serving.inputs import InputError, Limits, parse_predict_request
from stage1_core.serving.model import ModelHolder, ReloadRefused, ServedModel

__all__ = ["ServeSettings", "ServiceMetrics", "create_app", "reload_bundle", "served_record"]

logger = logging.getLogger(__name__)

#: Paths reported by name in the request counter (anything else is "other", to bound label values).
KNOWN_PATHS = ("/predict", "/health", "/metrics", "/reload")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 9.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches and what it accepts."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    num_workers: int | None = 0
    limits: Limits = field(default_factory=Limits)


class ServiceMetrics:
    """The service's Prometheus metrics, in their own registry (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stage1_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("stage1_predict_latency_seconds", "POST /predict time from receipt to answer",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decisions = Counter("stage1_decisions", "images decided, by outcome (exit_roadwork, exit_no_roadwork, "
                                 "defer)", ["decision"], registry=self.registry)
        self.errors = Counter("stage1_errors", "refused or failed predictions by reason", ["reason"],
                              registry=self.registry)
        self.batch_size = Histogram("stage1_batch_size", "images per forward pass", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.reloads = Counter("stage1_reloads", "bundle reloads by outcome", ["outcome"], registry=self.registry)
        self.bundle = Gauge("stage1_bundle_info", "the serving bundle (value 1)", ["bundle_id", "phase", "policy"],
                            registry=self.registry)

    def set_bundle(self, served: ServedModel) -> None:
        self.bundle.clear()
        self.bundle.labels(served.bundle_id, str(served.phase), served.policy).set(1)


def served_record(record: dict[str, Any], served: ServedModel) -> dict[str, Any]:
    """One image's answer, checked: a probability that is not a finite float in [0, 1] raises ``ValueError``."""
    p = record.get("p_roadwork")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"the model produced p_roadwork={p!r}, not a probability in [0, 1]; not answered")
    exited = bool(record["exit"])
    label = record["label"]
    return {
        "p_roadwork": float(p),
        "exit": exited,
        "label": None if label is None else int(label),
        "prediction_set": [int(v) for v in record["prediction_set"]],
        "bundle_id": served.bundle_id,
    }


def _decision(record: dict[str, Any]) -> str:
    if not record["exit"]:
        return "defer"
    return "exit_roadwork" if record["label"] == 1 else "exit_no_roadwork"


def _error(status: int, reason: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": reason, **extra}, status_code=status)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes`` (never buffered beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise InputError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(holder: ModelHolder, settings: ServeSettings | None = None) -> FastAPI:
    """The service for the bundle ``holder`` serves (and reloads)."""
    settings = settings or ServeSettings()
    metrics = ServiceMetrics()
    metrics.set_bundle(holder.current)

    def run_batch(images: list[Any]) -> tuple[ServedModel, list[dict[str, Any]]]:
        served = holder.current  # read once: the whole batch is decided by one bundle
        records = served.bundle.predictor.predict(images, batch_size=settings.max_batch,
                                                  num_workers=settings.num_workers)
        metrics.batch_size.observe(len(images))
        return served, records

    batcher: MicroBatcher = MicroBatcher(run_batch, max_batch=settings.max_batch,
                                         max_wait_s=settings.max_wait_ms / 1000.0, max_queue=settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="Stage-1 prediction service", lifespan=lifespan)
    app.state.holder = holder
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.settings = settings

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        path = request.url.path if request.url.path in KNOWN_PATHS else "other"
        try:
            response = await call_next(request)
        except Exception:
            metrics.requests.labels(path, "500").inc()
            raise
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = await _read_body(request, settings.limits.max_bytes)
            parsed = await run_in_threadpool(parse_predict_request, body, request.headers.get("content-type"),
                                             settings.limits)
        except InputError as exc:
            metrics.errors.labels(f"http_{exc.status}").inc()
            return _error(exc.status, exc.reason)
        try:
            future = batcher.submit(parsed.images)
        except BatcherBusy as exc:
            metrics.errors.labels("busy").inc()
            return _error(503, str(exc), retry_after_s=1)
        except BatcherStopped as exc:
            metrics.errors.labels("stopping").inc()
            return _error(503, str(exc))
        try:
            served, records, batch_size = await asyncio.wait_for(asyncio.wrap_future(future),
                                                                 settings.request_timeout_s)
            answers = [served_record(r, served) for r in records]
        except asyncio.TimeoutError:
            metrics.errors.labels("timeout").inc()
            return _error(504, f"no answer within {settings.request_timeout_s} s (queue: {batcher.waiting} waiting)")
        except BatcherStopped as exc:
            metrics.errors.labels("stopping").inc()
            return _error(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch: say so, keep serving
            logger.exception("prediction failed")
            metrics.errors.labels("model").inc()
            return _error(500, f"prediction failed: {type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - start
        metrics.latency.observe(elapsed)
        for answer in answers:
            metrics.decisions.labels(_decision(answer)).inc()
            answer["batch_size"] = batch_size
            answer["elapsed_ms"] = round(elapsed * 1000.0, 3)
        if parsed.batch:
            return JSONResponse({"results": answers, "bundle_id": served.bundle_id})
        return JSONResponse(answers[0])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **holder.current.describe(), "pinned": holder.expected_id is not None,
                "queue": batcher.waiting, "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.set_bundle(holder.current)  # a reload by signal changes it too
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reload")
    async def reload(request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            return _error(400, f"body is not valid JSON ({exc}); send {{}} or {{\"id\": ..., \"bundle\": ...}}")
        if not isinstance(payload, dict) or set(payload) - {"id", "bundle"} or not all(
            isinstance(v, str) and v for v in payload.values()
        ):
            return _error(400, 'body must be a JSON object with optional string fields "id" and "bundle"')
        try:
            served = await run_in_threadpool(reload_bundle, app, payload.get("bundle"), payload.get("id"))
        except ReloadRefused as exc:
            return _error(409, str(exc), problems=exc.problems, serving=holder.current.bundle_id)
        return JSONResponse({"status": "reloaded", **served.describe()})

    return app


def reload_bundle(app: FastAPI, directory: str | None = None, expected_id: str | None = None) -> ServedModel:
    """Reload the app's bundle (``POST /reload`` and the reload signal both come here), counted in the metrics."""
    metrics: ServiceMetrics = app.state.metrics
    try:
        served = app.state.holder.reload(directory, expected_id)
    except ReloadRefused as exc:
        metrics.reloads.labels("refused").inc()
        logger.error("%s", exc)
        raise
    metrics.reloads.labels("loaded").inc()
    metrics.set_bundle(served)
    return served
