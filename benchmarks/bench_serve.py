"""Latency and throughput of ``stage1 serve`` under concurrent clients, against the bare in-process forward.

The real service (``python -m stage1_core.cli serve`` on 127.0.0.1) is driven by C client threads,
each sending one base64 JPEG per request (as the subnet sends them) with the standard-library
client and waiting for the answer before sending the next. For each C the script prints the
per-request latency (p50, p99), the served throughput (images/s), the mean batch the service
formed, and the bare forward at batch size min(C, --max-batch): ``inference_mode`` through the
backbone on images decoded and transformed beforehand, in this process. Ratios:

* ``thr ratio`` = served images/s / bare images/s at that batch size (what HTTP, base64, JPEG
  decoding, preprocessing, the head, the policy and batching cost together);
* ``lat ratio`` = served p50 latency / bare time of one forward of that batch size.

Clients, service and bare forward share this machine's CPUs; the bare forward is measured just
before and just after each served run (while the service is idle) and averaged, both with
``--torch-threads`` intra-op threads. Without ``--bundle``, a bundle on the builtin backbone (``builtin:tiny-dinov3``,
224x224 input) with a seeded head and a certified softmax policy is built with the unit tests'
helpers; ``--bundle DIR`` measures that bundle (e.g. the demo's phase-1 bundle).

    python benchmarks/bench_serve.py [--concurrency 1,4,16] [--requests 128] [--max-batch 16]
                                     [--max-wait-ms 5] [--bundle DIR] [--artifacts_root DIR]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stage1_core.bundle.load import Stage1Bundle, bundle_id  # noqa: E402
from stage1_core.data.datasets import load_rgb, read_labels_csv  # noqa: E402
from stage1_core.data.synthetic import generate_synthetic_dataset  # noqa: E402
from stage1_core.serving import client  # noqa: E402


def build_bundle(work: Path, artifacts_root: Path) -> Path:
    """A phase-1 style bundle on the builtin tiny backbone (seeded head, certified softmax policy)."""
    from stage1_core.data.transforms import build_eval_transform, describe_transform
    from stage1_core.model.backbone import DINOv3Backbone
    from tests.unit.test_bundle_export import export_test_bundle
    from tests.unit.test_predictor import make_head

    out = work / "bench_bundle"
    if (out / "bundle" / "bundle.json").is_file():
        return out / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    backbone = DINOv3Backbone.load("builtin:tiny-dinov3", artifacts_root=artifacts_root)
    transform = build_eval_transform()
    info = {"model_path": "builtin:tiny-dinov3", "fingerprint": backbone.fingerprint(),
            "hidden_size": backbone.hidden_size, "transform": describe_transform(transform)}
    head = make_head(hidden=backbone.hidden_size, scale=4.0)
    return export_test_bundle(out, head, 0.9, backbone_info=info,
                              head_info={"hidden_size": backbone.hidden_size, "dropout": 0.3, "with_gate": False})


def start_service(bundle: Path, artifacts_root: Path, max_batch: int, max_wait_ms: float,
                  threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "stage1_core.cli", "serve", "--bundle", str(bundle), "--id", bundle_id(bundle),
         "--host", "127.0.0.1", "--port", "0", "--artifacts_root", str(artifacts_root), "--device", "cpu",
         "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            if "listening on http://" in line and not url:
                url.append(line.split("listening on ", 1)[1].strip())
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180) or not url:
        process.kill()
        raise SystemExit("stage1 serve did not start")
    return process, url[0]


def drive(url: str, payloads: list[str], concurrency: int, requests: int) -> tuple[list[float], float, list[int]]:
    """(per-request latencies in s, wall seconds, batch sizes) for ``requests`` requests from ``concurrency`` clients."""
    latencies: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        for i in range(offset, requests, concurrency):
            start = time.perf_counter()
            answer = client.predict(url, payloads[i % len(payloads)], timeout=60.0)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                batches.append(int(answer["batch_size"]))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return latencies, time.perf_counter() - start, batches


def bare_forward(backbone, pixels: torch.Tensor, batch: int, images: int) -> tuple[float, float]:
    """(images/s, seconds per forward) of ``images`` images in forwards of ``batch``."""
    reps = max(1, images // batch)
    index = torch.arange(batch) % pixels.shape[0]
    chunk = pixels[index]
    with torch.inference_mode():
        backbone.model(pixel_values=chunk)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            backbone.model(pixel_values=chunk).last_hidden_state[:, 0]
        wall = time.perf_counter() - start
    return reps * batch / wall, wall / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=128, help="requests per client count")
    parser.add_argument("--images", type=int, default=32, help="distinct JPEG images sent round-robin")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--artifacts_root", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, backbone and bundle here")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads of the service and of the bare forward (default 1: same budget for both)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    artifacts_root = args.artifacts_root or work
    data = work / f"synthetic_{args.images}"
    if not (data / "train_labels.csv").is_file():
        generate_synthetic_dataset(data, n_train=args.images, n_val=1, seed=0, progress=False)
    paths = [s.path for s in read_labels_csv(data / "train_labels.csv", data / "train")][: args.images]
    payloads = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
    bundle_dir = args.bundle or build_bundle(work, artifacts_root)

    bundle = Stage1Bundle.load(bundle_dir, artifacts_root=artifacts_root)
    backbone = bundle.load_backbone()
    pixels = torch.stack([bundle.predictor.transform(load_rgb(p)) for p in paths])
    size = tuple(pixels.shape[-2:])
    reference = bundle.predict(paths)

    process, url = start_service(bundle_dir, artifacts_root, args.max_batch, args.max_wait_ms, args.torch_threads)
    try:
        drive(url, payloads, 2, 16)  # warm-up
        served = [client.predict(url, payload, timeout=60.0) for payload in payloads]
        worst = max(abs(s["p_roadwork"] - r["p_roadwork"]) for s, r in zip(served, reference))
        same = sum(s["exit"] == r["exit"] and s["label"] == r["label"] for s, r in zip(served, reference))
        print(f"bundle {bundle_id(bundle_dir)[:16]} on cpu ({args.torch_threads} torch thread(s) in the service and here, "
              f"{os.cpu_count()} CPUs), input {size[0]}x{size[1]}, {len(paths)} JPEGs; served vs Stage1Bundle.predict: "
              f"{same}/{len(paths)} same decisions, max |dp| {worst:.2e}")
        print(f"service: --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}; {args.requests} requests per row")
        header = (f"{'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'served img/s':>12} {'mean batch':>10} "
                  f"{'bare batch':>10} {'bare img/s':>10} {'bare ms':>8} {'thr ratio':>9} {'lat ratio':>9}")
        print(header)
        for clients in levels:
            batch = min(clients, args.max_batch)
            # Bare forward just before and just after the served run: the machine's load is the same for both.
            before = bare_forward(backbone, pixels, batch, args.requests)
            latencies, wall, batches = drive(url, payloads, clients, args.requests)
            after = bare_forward(backbone, pixels, batch, args.requests)
            bare_rate, bare_s = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            p50 = float(np.percentile(latencies, 50))
            p99 = float(np.percentile(latencies, 99))
            rate = len(latencies) / wall
            print(f"{clients:>7} {p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f} {rate:>12.1f} {statistics.mean(batches):>10.2f} "
                  f"{batch:>10} {bare_rate:>10.1f} {bare_s * 1e3:>8.1f} {rate / bare_rate:>9.2f} {p50 / bare_s:>9.2f}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
