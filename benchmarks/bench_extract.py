"""Throughput of the feature-cache path against a bare forward pass, same model, batch and threads.

Three measurements, in one process, on the builtin backbone (``builtin:tiny-dinov3``):

* ``bare``: ``inference_mode`` forward over images decoded and transformed beforehand (the
  ceiling: nothing but the transformer);
* ``cache (tensors)``: :func:`stage1_core.features.extract_split_features` over the same
  pre-decoded tensors (our loop, DataLoader, bookkeeping and writing the cache);
* ``cache (JPEG files)``: the same function over the JPEG files through the evaluation transform
  (what ``extract_features`` really does: decode, resize, crop to uint8 in decoding threads,
  normalise per batch, forward, save).

The three run ``--repeats`` times, interleaved (bare, tensors, files, bare, ...), so a machine
shared with other work slows them alike; the ratio of each repetition uses the bare time of the
same repetition. Printed: best images/s and the ratio of the best times (the least disturbed
repetitions), and the per-repetition ratios with their median and range (target for JPEG files:
>= 0.8). ``--decoding processes`` measures the DataLoader-worker
variant instead of threads.

    python benchmarks/bench_extract.py [--n 256] [--batch 64] [--num_workers N] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from stage1_core import features
from stage1_core.data.datasets import LabelledImageDataset, read_labels_csv
from stage1_core.data.loaders import resolve_num_workers
from stage1_core.data.synthetic import generate_synthetic_dataset
from stage1_core.data.transforms import describe_transform
from stage1_core.features import extract_split_features
from stage1_core.model.backbone import DINOv3Backbone


class PreDecoded(Dataset):
    """Already transformed images with ids and labels."""

    def __init__(self, images: torch.Tensor, labels: list[int], ids: list[str]) -> None:
        self.images, self.labels, self.sample_ids = images, labels, ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def bare_forward(backbone: DINOv3Backbone, images: torch.Tensor, batch: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the bare forward."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            backbone.model(pixel_values=images[i : i + batch]).last_hidden_state[:, 0]
    return time.perf_counter() - start, time.process_time() - cpu


def cache_path(backbone: DINOv3Backbone, dataset: Dataset, transform: str, batch: int, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process - decoding threads included) of one extraction."""
    out = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        start, cpu = time.perf_counter(), time.process_time()
        manifest = extract_split_features(
            backbone, {"bench": dataset}, out, transform, batch_size=batch, device="cpu", progress=False,
            num_workers=workers,
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        assert manifest.forward_passes > 0
        return seconds, cpu_seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def spread(ratios: list[float]) -> str:
    return f"median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, per repetition " + \
        " ".join(f"{r:.3f}" for r in ratios) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None, help="decoding workers of the cache path (default: the pipeline's)")
    parser.add_argument("--decoding", choices=["threads", "processes"], default="threads",
                        help="decode in threads of this process (the pipeline's default) or in DataLoader workers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and backbone here (default: a temp dir)")
    args = parser.parse_args()
    features.THREADED_DECODING = args.decoding == "threads"

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    data = work / f"synthetic_{args.n}"
    if not (data / "train_labels.csv").is_file():
        generate_synthetic_dataset(data, n_train=args.n, n_val=1, seed=0, progress=False)
    samples = read_labels_csv(data / "train_labels.csv", data / "train")
    backbone = DINOv3Backbone.load("builtin:tiny-dinov3", artifacts_root=work)
    files = LabelledImageDataset(samples)
    transform = describe_transform(files.transform)
    images = torch.stack([files[i][0] for i in range(len(files))])
    tensors = PreDecoded(images, files.labels, files.sample_ids)
    workers = resolve_num_workers(args.num_workers)

    bare_forward(backbone, images[: args.batch], args.batch)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "cache (tensors)": [], "cache (JPEG files)": []}
    for _ in range(args.repeats):
        runs["bare"].append(bare_forward(backbone, images, args.batch))
        runs["cache (tensors)"].append(cache_path(backbone, tensors, transform, args.batch, 0))
        runs["cache (JPEG files)"].append(cache_path(backbone, files, transform, args.batch, workers))

    print(f"images: {args.n}, batch: {args.batch}, torch threads: {torch.get_num_threads()}, "
          f"decoding: {args.decoding} x {workers} (tensors: 0), repeats: {args.repeats} (interleaved)")
    best_bare = min(t[0] for t in runs["bare"])
    for name, values in runs.items():
        ratios = [bare[0] / t[0] for bare, t in zip(runs["bare"], values)]
        best = min(t[0] for t in values)
        print(f"{name:>20}: best {args.n / best:8.1f} images/s (best-of ratio {best_bare / best:.3f}); "
              f"ratio to bare {spread(ratios)}")
    jpeg = [bare[0] / t[0] for bare, t in zip(runs["bare"], runs["cache (JPEG files)"])]
    print(f"ratio cache(JPEG files)/bare = {statistics.median(jpeg):.3f} median of {args.repeats} (target >= 0.8)")
    if args.decoding == "threads":
        # CPU seconds per image barely depend on other load on the machine: a cross-check of the
        # wall-clock ratio on a shared machine (conservative: the bare forward may leave cores idle).
        cpu = [bare[1] / t[1] for bare, t in zip(runs["bare"], runs["cache (JPEG files)"])]
        print(f"CPU-time ratio cache(JPEG files)/bare = {statistics.median(cpu):.3f} median "
              f"(range {min(cpu):.3f}-{max(cpu):.3f})")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
