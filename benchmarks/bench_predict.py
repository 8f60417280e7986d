"""Throughput of ``Stage1Bundle.predict`` on JPEG files against a bare forward pass.

``Stage1Bundle.predict`` hands the images to :meth:`Stage1Predictor.predict`: decoding threads
turn each file into ``uint8`` pixels (decode, EXIF/mode handling, resize, crop) while the
backbone runs, each batch is normalised on the device, then the head and the exit policy
decide. Measured in one process on the builtin backbone (``builtin:tiny-dinov3``):

* ``bare``: ``inference_mode`` forward over images decoded and transformed beforehand;
* ``predict (JPEG files)``: the predictor over the file paths, with a head and a softmax exit
  policy (``--bundle DIR`` measures that bundle's ``Stage1Bundle.predict`` instead; its backbone
  must be the builtin one or reachable from ``--artifacts_root``).

Interleaved repetitions; each ratio uses the bare time of its own repetition. Target >= 0.8.

    python benchmarks/bench_predict.py [--n 256] [--batch 64] [--num_workers N] [--repeats 5] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stage1_core.bundle.predictor import Stage1Predictor
from stage1_core.data.datasets import load_rgb, read_labels_csv
from stage1_core.data.loaders import resolve_num_workers
from stage1_core.data.synthetic import generate_synthetic_dataset
from stage1_core.data.transforms import build_eval_transform
from stage1_core.model.backbone import DINOv3Backbone
from stage1_core.model.head import Stage1Head
from stage1_core.policies import SoftmaxExitPolicy


def bare_forward(backbone: DINOv3Backbone, images: torch.Tensor, batch: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the bare forward."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            backbone.model(pixel_values=images[i : i + batch]).last_hidden_state[:, 0]
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle", type=Path, default=None, help="measure this bundle's Stage1Bundle.predict")
    parser.add_argument("--artifacts_root", type=Path, default=None, help="where the bundle's builtin backbone is built")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and backbone here (default: a temp dir)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    data = work / f"synthetic_{args.n}"
    if not (data / "train_labels.csv").is_file():
        generate_synthetic_dataset(data, n_train=args.n, n_val=1, seed=0, progress=False)
    paths = [s.path for s in read_labels_csv(data / "train_labels.csv", data / "train")]
    workers = resolve_num_workers(args.num_workers)
    if args.bundle is not None:
        from stage1_core.bundle.load import Stage1Bundle

        bundle = Stage1Bundle.load(args.bundle, artifacts_root=args.artifacts_root or work)
        backbone = bundle.load_backbone()
        transform = bundle.predictor.transform

        def predict() -> list:
            return bundle.predictor.predict(paths, batch_size=args.batch, num_workers=workers)
        label = "Stage1Bundle.predict (JPEG files)"
    else:
        backbone = DINOv3Backbone.load("builtin:tiny-dinov3", artifacts_root=work)
        transform = build_eval_transform()
        predictor = Stage1Predictor(Stage1Head(backbone.hidden_size), SoftmaxExitPolicy(0.5), backbone=backbone,
                                    transform=transform)

        def predict() -> list:
            return predictor.predict(paths, batch_size=args.batch, num_workers=workers)
        label = "predict (JPEG files)"
    images = torch.stack([transform(load_rgb(p)) for p in paths])  # the bare forward's pre-decoded input

    bare_forward(backbone, images[: args.batch], args.batch)  # warm-up
    assert len(predict()) == len(paths)
    bare, timed = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(backbone, images, args.batch))
        start, cpu = time.perf_counter(), time.process_time()
        predict()
        timed.append((time.perf_counter() - start, time.process_time() - cpu))
    ratios = [b[0] / t[0] for b, t in zip(bare, timed)]
    cpu_ratios = [b[1] / t[1] for b, t in zip(bare, timed)]
    print(f"images: {len(paths)}, batch: {args.batch}, torch threads: {torch.get_num_threads()}, "
          f"decoding threads: {workers}, repeats: {args.repeats} (interleaved)")
    best_bare, best = min(b[0] for b in bare), min(t[0] for t in timed)
    print(f"{'bare':>34}: best {len(paths) / best_bare:8.1f} images/s")
    print(f"{label:>34}: best {len(paths) / best:8.1f} images/s (best-of ratio {best_bare / best:.3f})")
    print(f"ratio predict/bare = {statistics.median(ratios):.3f} median of {args.repeats} (range "
          f"{min(ratios):.3f}-{max(ratios):.3f}, per repetition {' '.join(f'{r:.3f}' for r in ratios)}) (target >= 0.8)")
    print(f"CPU-time ratio predict/bare = {statistics.median(cpu_ratios):.3f} median "
          f"(range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
