"""Sharded feature extraction: throughput with 1 and 2 ranks of ``torchrun`` on this machine, as a ratio.

Each measurement is a ``torchrun --standalone`` job (gloo, CPU) that extracts the CLS features
of ``--n`` pre-decoded 224x224 images with the builtin backbone (``builtin:tiny-dinov3``) into
a fresh feature store, batch ``--batch``: every rank its whole batches, rank 0 merging and
writing the manifest (:mod:`stage1_core.distributed.extract`). The machine's threads
(``--threads``, default all cores) are split between the ranks, so the comparison is the same
CPU used by one process or by two. Timed inside the job, between two barriers (process start
and imports excluded; they are printed apart as the launch overhead). The world sizes
alternate for ``--repeats`` rounds, so a machine shared with other work slows them alike; the
ratio is taken per round.

On GPUs each rank would own a device (NCCL, ``cuda:LOCAL_RANK``): the ranks would no longer
split one pool of cores, so throughput would scale with the GPU count until image decoding or
the store's merge on rank 0 bound it; features would then agree within float tolerance, not
byte for byte (kernels differ with batch shapes and devices).

    python benchmarks/bench_distributed.py [--images 256] [--batch-size 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]


class Images(Dataset):
    """Seeded pre-decoded images with ids and labels."""

    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        self.labels = [i % 2 for i in range(n)]
        self.sample_ids = [f"img_{i:05d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def worker(args: argparse.Namespace) -> None:
    """One rank: extract, timed between barriers; rank 0 prints the result as JSON."""
    from stage1_core.distributed import env
    from stage1_core.distributed.extract import extract_features
    from stage1_core.model.backbone import DINOv3Backbone

    torch.set_num_threads(args.threads_per_rank)
    env.init_from_env("cpu")
    try:
        backbone = DINOv3Backbone.load(args.backbone_dir)
        data = {"train": Images(args.images)}
        env.barrier()
        started = time.perf_counter()
        manifest = extract_features(backbone, data, args.out_dir, "bench", batch_size=args.batch_size, device="cpu",
                                    progress=False, num_workers=0)
        env.barrier()
        seconds = time.perf_counter() - started
        if env.is_main():
            print(json.dumps({"seconds": seconds, "images": args.images, "forward_passes": manifest.forward_passes}))
    finally:
        env.shutdown()


def measure(world: int, args: argparse.Namespace, backbone: Path, scratch: Path, threads: int | None = None,
            ) -> tuple[float, float]:
    """``(images/s inside the job, launch overhead s)`` of one job of ``world`` ranks (threads split by default)."""
    threads = threads or max(1, args.threads // world)
    out = Path(tempfile.mkdtemp(dir=scratch))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(Path(__file__).resolve()), "--worker", "--backbone-dir", str(backbone), "--out-dir", str(out),
               "--images", str(args.images), "--batch-size", str(args.batch_size), "--threads-per-rank", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {world} ranks failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    return result["images"] / result["seconds"], wall - result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by the ranks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--threads-per-rank", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from stage1_core.model.backbone import resolve_backbone

    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        scratch = Path(tmp)
        backbone = resolve_backbone("builtin:tiny-dinov3", scratch)
        rounds = []
        for repeat in range(args.repeats):
            one, launch1 = measure(1, args, backbone, scratch)
            two, launch2 = measure(2, args, backbone, scratch)
            # One rank on the thread count each of the two ranks gets: what one rank alone achieves.
            single, _ = measure(1, args, backbone, scratch, threads=max(1, args.threads // 2))
            rounds.append((one, two, single))
            print(f"round {repeat + 1}: 1 rank x {args.threads} threads {one:7.1f} img/s | 2 ranks x "
                  f"{max(1, args.threads // 2)} threads {two:7.1f} img/s | ratio {two / one:.2f} | "
                  f"1 rank x {max(1, args.threads // 2)} threads {single:7.1f} img/s (2 ranks / it: "
                  f"{two / single:.2f}) | launch overhead {launch1:.1f} s / {launch2:.1f} s", flush=True)
    ratios = [two / one for one, two, _ in rounds]
    scaling = [two / single for _, two, single in rounds]
    print(f"\n{args.images} images, batch {args.batch_size}, {args.threads} threads in all: best 1 rank "
          f"{max(r[0] for r in rounds):.1f} img/s, best 2 ranks {max(r[1] for r in rounds):.1f} img/s; "
          f"ratio 2/1 median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"2 ranks over 1 rank of as many threads per rank: median {statistics.median(scaling):.2f}")


if __name__ == "__main__":
    main()
