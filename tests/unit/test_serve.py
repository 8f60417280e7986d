"""``stage1 serve``: the real service on 127.0.0.1, driven over HTTP by urllib and by the shipped client.

Two services are started as subprocesses of the real CLI (``python -m stage1_core.cli serve``):
one pinned to a bundle for the prediction, bad-input, concurrency, metrics and client tests, and
one for the reload tests (``POST /reload`` and SIGHUP). Every wait is bounded.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stage1_core.bundle.load import Stage1Bundle, bundle_id
from stage1_core.data.transforms import describe_transform
from stage1_core.serving import client as client_module
from stage1_core.serving.miner import CLIENT_FILE, export_miner

from tests.unit.test_bundle_export import export_test_bundle
from tests.unit.test_predictor import (  # noqa: F401  (fixtures)
    HIDDEN,
    draw_images,
    eval_transform,
    make_head,
    max_probs,
    tiny_backbone,
    tiny_backbone_dir,
)

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0
MAX_PIXELS = 5000
MAX_BYTES = 200_000
HOTKEY = "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX"


# ----- fixtures ------------------------------------------------------------------------------


def make_images(directory: Path, n: int = 10, seed: int = 0) -> list[Path]:
    """Two drawn road scenes plus noisy ones of several sizes and formats (all under MAX_PIXELS)."""
    paths = draw_images(directory)
    rng = np.random.default_rng(seed)
    for i in range(n - len(paths)):
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = directory / (f"noise{i}.jpg" if i % 2 == 0 else f"noise{i}.png")
        Image.fromarray(pixels).save(path, **({"quality": 85} if path.suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def _export(tmp: Path, head: torch.nn.Module, backbone, backbone_dir: Path, images: list[Path], name: str) -> Path:
    transform = eval_transform()
    feats = backbone.extract(torch.stack([transform(Image.open(p).convert("RGB")) for p in images]))
    threshold = float(np.median(max_probs(head, feats.numpy())))  # some images exit, some defer
    info = {"model_path": str(backbone_dir), "fingerprint": backbone.fingerprint(), "hidden_size": HIDDEN,
            "transform": describe_transform(transform)}
    (tmp / name).mkdir()
    return export_test_bundle(tmp / name, head, threshold, backbone_info=info)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("serve-images"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_backbone, tiny_backbone_dir, images):
    """Two bundles on the same backbone with different heads (different ids and probabilities)."""
    tmp = tmp_path_factory.mktemp("serve-bundles")
    a = _export(tmp, make_head(seed=0), tiny_backbone, tiny_backbone_dir, images, "a")
    b = _export(tmp, make_head(seed=5), tiny_backbone, tiny_backbone_dir, images, "b")
    assert bundle_id(a) != bundle_id(b)
    return a, b


@pytest.fixture(scope="module")
def expected(bundles, images):
    """What Stage1Bundle.predict answers for every image, per bundle id."""
    return {bundle_id(b): Stage1Bundle.load(b).predict(images) for b in bundles}


class Service:
    """A ``stage1 serve`` subprocess on 127.0.0.1 and a small urllib client for it."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stage1_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        found = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                if "listening on http://" in line:
                    self.url = line.split("listening on ", 1)[1].strip()
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(START_TIMEOUT_S) or self.url is None:
            self.stop()
            raise AssertionError("stage1 serve did not start:\n" + "\n".join(self.lines))

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 30.0) -> tuple[int, dict | str]:
        headers = {"Content-Type": content_type} if content_type else {}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in kind else raw.decode())

    def predict_json(self, payload: dict) -> tuple[int, dict]:
        return self.request("POST", "/predict", json.dumps(payload).encode(), "application/json")

    def metrics(self) -> dict[str, float]:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stopped_cleanly(self) -> bool:
        """Exited after SIGTERM by uvicorn's graceful shutdown (which re-raises the signal it caught)."""
        return self.process.returncode in (0, -signal.SIGTERM) and not any("Traceback" in line for line in self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture(scope="module")
def service(bundles):
    a, _ = bundles
    svc = Service("--bundle", str(a), "--id", bundle_id(a), "--max-wait-ms", "20", "--max-batch", "8",
                  "--max-pixels", str(MAX_PIXELS), "--max-bytes", str(MAX_BYTES), "--max-images", "16")
    yield svc
    svc.stop()
    assert svc.stopped_cleanly(), "\n".join(svc.lines)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def assert_same_decision(answer: dict, reference: dict) -> None:
    assert answer["exit"] == reference["exit"]
    assert answer["label"] == reference["label"]
    assert answer["prediction_set"] == reference["prediction_set"]
    assert answer["p_roadwork"] == pytest.approx(reference["p_roadwork"], abs=1e-5)  # batching changes rounding
    assert 0.0 <= answer["p_roadwork"] <= 1.0


# ----- one pinned service --------------------------------------------------------------------


def test_health_names_the_pinned_bundle(service, bundles):
    status, health = service.request("GET", "/health")
    assert status == 200
    assert health["status"] == "ok" and health["bundle_id"] == bundle_id(bundles[0]) and health["pinned"] is True
    assert health["phase"] == 1 and health["policy"] == "softmax" and health["device"] == "cpu"
    assert health["backbone"]["fingerprint"] == Stage1Bundle.load(bundles[0]).manifest["backbone"]["fingerprint"]


def test_answers_equal_stage1_bundle_predict_in_every_request_shape(service, bundles, images, expected):
    reference = expected[bundle_id(bundles[0])]
    assert {r["exit"] for r in reference} == {True, False}, "fixture: some images must exit and some defer"
    for path, ref in zip(images, reference):
        status, raw = service.request("POST", "/predict", path.read_bytes(), "application/octet-stream")
        assert status == 200, raw
        assert_same_decision(raw, ref)
        assert raw["bundle_id"] == bundle_id(bundles[0]) and raw["elapsed_ms"] > 0 and raw["batch_size"] >= 1
        status, one = service.predict_json({"image": b64(path)})
        assert status == 200, one
        assert_same_decision(one, ref)
    kind = "jpeg" if images[0].suffix == ".jpg" else "png"
    status, uri = service.predict_json({"image": f"data:image/{kind};base64," + b64(images[0])})
    assert status == 200 and uri["p_roadwork"] == pytest.approx(reference[0]["p_roadwork"], abs=1e-5)
    status, batch = service.predict_json({"images": [b64(p) for p in images]})
    assert status == 200, batch
    assert len(batch["results"]) == len(images) and batch["bundle_id"] == bundle_id(bundles[0])
    for answer, ref in zip(batch["results"], reference):
        assert_same_decision(answer, ref)
    assert [r["batch_size"] for r in batch["results"]] == [len(images)] * len(images)  # one job, decided at once


def _png_of(size: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_inputs_get_a_4xx_with_the_reason_and_the_service_keeps_serving(service, images):
    before = service.metrics()
    good = b64(images[0])
    cases = [
        (service.request("POST", "/predict", b"not an image at all", "image/jpeg"), 422, "cannot decode the image"),
        (service.request("POST", "/predict", images[0].read_bytes()[:60], "image/jpeg"), 422, "cannot decode"),
        (service.request("POST", "/predict", b"", "application/octet-stream"), 400, "empty"),
        (service.request("POST", "/predict", b"{not json", "application/json"), 400, "not valid JSON"),
        (service.predict_json({"image": "%%% not base64 %%%"}), 400, "not valid base64"),
        (service.predict_json({"image": 42}), 400, "expected a base64 string"),
        (service.predict_json({"image": good, "images": [good]}), 400, "exactly one of"),
        (service.predict_json({"images": []}), 400, "non-empty list"),
        (service.predict_json({"images": [good, base64.b64encode(b"garbage").decode()]}), 422, "images[1]"),
        (service.predict_json({"images": [good] * 17}), 413, "at most 16"),
        (service.request("POST", "/predict", b"x" * (MAX_BYTES + 1), "image/png"), 413, "exceeds the limit"),
        (service.request("POST", "/predict", _png_of((100, 100)), "image/png"), 413, "pixels exceeds the limit"),
        (service.request("POST", "/predict", b"hello", "text/plain"), 415, "unsupported Content-Type"),
        (service.request("GET", "/predict"), 405, None),
        (service.request("POST", "/reload", b"[1]", "application/json"), 400, "optional string fields"),
    ]
    for (status, body), want, fragment in cases:
        assert status == want, (want, fragment, body)
        if fragment is not None:
            assert fragment in body["error"], body
    status, ok = service.request("POST", "/predict", images[0].read_bytes(), "image/jpeg")
    assert status == 200 and 0.0 <= ok["p_roadwork"] <= 1.0
    assert service.process.poll() is None
    after = service.metrics()
    refused = sum(v for k, v in after.items() if k.startswith("stage1_errors_total"))
    refused_before = sum(v for k, v in before.items() if k.startswith("stage1_errors_total"))
    assert refused - refused_before == 13  # the /predict refusals above (not the 405, not /reload's 400)
    assert after['stage1_requests_total{"endpoint": "/predict", "status": "422"}'] >= 3


def test_concurrent_clients_are_all_answered_correctly(service, bundles, images, expected):
    reference = expected[bundle_id(bundles[0])]
    jobs = [i % len(images) for i in range(48)]

    def ask(index: int) -> tuple[int, int, dict]:
        status, answer = service.predict_json({"image": b64(images[index])})
        return index, status, answer

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, jobs))
    assert len(answers) == len(jobs)
    for index, status, answer in answers:
        assert status == 200, answer
        assert_same_decision(answer, reference[index])
    sizes = [answer["batch_size"] for _, _, answer in answers]
    assert max(sizes) <= 8, f"a batch exceeded --max-batch 8: {sizes}"


def test_metrics_are_prometheus_text_with_requests_latency_exits_and_errors(service, bundles):
    service.request("POST", "/predict", b"garbage", "image/png")
    samples = service.metrics()
    names = {key.split("{", 1)[0] for key in samples}
    for name in ("stage1_requests_total", "stage1_predict_latency_seconds_bucket", "stage1_predict_latency_seconds_count",
                 "stage1_decisions_total", "stage1_errors_total", "stage1_batch_size_bucket", "stage1_bundle_info"):
        assert name in names, f"{name} missing from /metrics: {sorted(names)}"
    decisions = {k: v for k, v in samples.items() if k.startswith("stage1_decisions_total")}
    assert sum(decisions.values()) >= 1 and any("defer" in k for k in decisions) and any("exit_" in k for k in decisions)
    assert samples['stage1_predict_latency_seconds_count{}'] >= 1
    assert samples['stage1_errors_total{"reason": "http_422"}'] >= 1
    info = f'stage1_bundle_info{{"bundle_id": "{bundle_id(bundles[0])}", "phase": "1", "policy": "softmax"}}'
    assert samples[info] == 1.0


def test_the_shipped_client_answers_the_service_probability_and_falls_back(service, bundles, images, expected,
                                                                            tmp_path):
    reference = expected[bundle_id(bundles[0])]
    out = export_miner(bundles[0], tmp_path / "submission", model_name="stage1-test", version="1.0.0",
                       submitted_by=HOTKEY)
    spec = importlib.util.spec_from_file_location("stage1_client_shipped", out / CLIENT_FILE)
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    for path, ref in zip(images[:3], reference[:3]):
        for image in (b64(path), path.read_bytes(), path, Image.open(path).convert("RGB")):
            p = shipped.predict_p_roadwork(service.url, image, timeout=10.0)
            assert isinstance(p, float) and p == pytest.approx(ref["p_roadwork"], abs=1e-5)

    # Run the shipped file by itself, isolated from site-packages: it needs the standard library only.
    run = subprocess.run([sys.executable, "-I", "-S", str(out / CLIENT_FILE), service.url, str(images[0])],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["p_roadwork"] == pytest.approx(reference[0]["p_roadwork"], abs=1e-5)

    # Nothing listening: the fallback, or ServiceUnavailable without one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert shipped.predict_p_roadwork(closed, b64(images[0]), timeout=2.0, fallback=0.5) == 0.5
    with pytest.raises(shipped.ServiceUnavailable, match="no answer"):
        shipped.predict_p_roadwork(closed, b64(images[0]), timeout=2.0)
    # A service that accepts the connection and never answers: bounded by the timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.perf_counter()
        p = shipped.predict_p_roadwork(f"http://127.0.0.1:{silent.getsockname()[1]}", b64(images[0]), timeout=0.5,
                                       fallback=0.9)
        assert p == 0.9 and time.perf_counter() - start < 10.0
    # A refused input is a failure too (HTTP 422), and a bad argument is the caller's bug.
    assert shipped.predict_p_roadwork(service.url, b"garbage", timeout=10.0, fallback=0.25) == 0.25
    with pytest.raises(TypeError, match="base64 str, bytes"):
        shipped.predict_p_roadwork(service.url, 12345, fallback=0.5)
    with pytest.raises(ValueError, match="fallback must be a probability"):
        shipped.predict_p_roadwork(service.url, b64(images[0]), fallback=1.5)


def test_the_client_file_imports_only_the_standard_library():
    import ast

    tree = ast.parse(Path(client_module.__file__).read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    outside = sorted(m for m in modules if m not in sys.stdlib_module_names and m != "__future__")
    assert not outside, f"stage1_client.py imports {outside}, which a miner's environment may not have"


# ----- reloading -----------------------------------------------------------------------------


def test_reload_switches_atomically_and_refusals_keep_the_old_bundle(tmp_path, bundles, images, expected):
    a, b = bundles
    id_a, id_b = bundle_id(a), bundle_id(b)
    live = tmp_path / "live"
    shutil.copytree(a, live)
    svc = Service("--bundle", str(live), "--max-wait-ms", "5")
    try:
        assert svc.request("GET", "/health")[1]["bundle_id"] == id_a

        # A wrong pin or a broken bundle is refused with the reasons; the old bundle still answers.
        status, refused = svc.request("POST", "/reload", json.dumps({"id": "f" * 64}).encode(), "application/json")
        assert status == 409 and refused["serving"] == id_a and any("is not the expected" in p for p in refused["problems"])
        broken = tmp_path / "broken"
        shutil.copytree(b, broken)
        (broken / "metrics.csv").write_text("metric,value\naccuracy,1.0\n")
        status, refused = svc.request("POST", "/reload", json.dumps({"bundle": str(broken)}).encode(),
                                      "application/json")
        assert status == 409 and any("metrics.csv: sha256" in p for p in refused["problems"])
        assert svc.request("GET", "/health")[1]["bundle_id"] == id_a

        # SIGHUP reloads the same directory (unpinned service: any verified bundle) in the background.
        shutil.rmtree(live)
        shutil.copytree(b, live)
        svc.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while svc.request("GET", "/health")[1]["bundle_id"] != id_b:
            assert time.monotonic() < deadline, "SIGHUP did not reload the bundle within 60 s\n" + "\n".join(svc.lines)
            time.sleep(0.2)
        status, answer = svc.predict_json({"image": b64(images[0])})
        assert answer["bundle_id"] == id_b
        assert_same_decision(answer, expected[id_b][0])

        # POST /reload while clients keep asking: every answer comes whole from one bundle.
        answers: list[dict] = []
        stop = threading.Event()

        def hammer(index: int) -> None:
            while not stop.is_set() and len(answers) < 2000:
                status, answer = svc.predict_json({"image": b64(images[index])})
                answers.append({**answer, "index": index, "status": status})

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        def wait_for(count: int) -> None:
            deadline = time.monotonic() + 60
            while len(answers) < count and time.monotonic() < deadline:
                time.sleep(0.02)

        for thread in threads:
            thread.start()
        wait_for(8)
        status, reloaded = svc.request("POST", "/reload", json.dumps({"bundle": str(a), "id": id_a}).encode(),
                                       "application/json")
        after_reload = len(answers)
        wait_for(after_reload + len(threads) + 8)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert status == 200 and reloaded["bundle_id"] == id_a, reloaded
        assert all(r["status"] == 200 for r in answers), [r for r in answers if r["status"] != 200][:3]
        assert {r["bundle_id"] for r in answers} == {id_a, id_b}, "the reload did not happen under load"
        for r in answers:
            assert_same_decision(r, expected[r["bundle_id"]][r["index"]])
        # Requests still in flight when the reload returned (one per client) may carry the old id; none after.
        late = answers[after_reload + len(threads):]
        assert late and all(r["bundle_id"] == id_a for r in late)
        health = svc.request("GET", "/health")[1]
        assert health["bundle_id"] == id_a and health["pinned"] is True
        metrics = svc.metrics()
        assert metrics['stage1_reloads_total{"outcome": "loaded"}'] == 2
        assert metrics['stage1_reloads_total{"outcome": "refused"}'] == 2
    finally:
        svc.stop()
    assert svc.stopped_cleanly(), "\n".join(svc.lines)


@pytest.mark.parametrize("p", [float("nan"), float("inf"), -0.1, 1.5, None, True, "0.5"])
def test_a_malformed_probability_is_never_answered(p):
    from types import SimpleNamespace

    from stage1_core.serving.app import served_record

    record = {"p_roadwork": p, "exit": False, "label": None, "prediction_set": [0, 1]}
    with pytest.raises(ValueError, match="not a probability"):
        served_record(record, SimpleNamespace(bundle_id="x"))
    good = served_record({**record, "p_roadwork": 0.25}, SimpleNamespace(bundle_id="x"))
    assert good == {"p_roadwork": 0.25, "exit": False, "label": None, "prediction_set": [0, 1], "bundle_id": "x"}
