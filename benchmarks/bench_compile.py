"""``torch.compile`` of the head (``compile_head``): what it costs and what it saves.

Two measurements on the same random features, eager head against ``torch.compile(head)``
(:func:`stage1_core.model.head.maybe_compile`), in one process and on one device:

* steady state: milliseconds per training step (forward, backward, AdamW step) after warm-up,
  the median of ``--repeats`` timed blocks;
* whole run: wall seconds of :func:`stage1_core.training.trainer.train_head` for ``--epochs``
  epochs. It runs after the steady-state measurement, so the compiled run reuses the kernels
  Inductor compiled and cached in this process: the first-step line is what a fresh process pays.

``compile_head: null`` (the default) compiles only on CUDA; the printed ratios say whether that
default holds on the machine at hand.

    python benchmarks/bench_compile.py [--n_train 8192] [--hidden 768] [--batch 64] [--epochs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stage1_core.config import Stage1ProConfig
from stage1_core.features import TensorSplit
from stage1_core.model.head import Stage1Head, maybe_compile
from stage1_core.training.trainer import train_head


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(
    compiled: bool, hidden: int, batch: int, device: torch.device, steps: int, repeats: int
) -> tuple[float, float]:
    """(median ms per training step after warm-up, seconds of the first step - compilation included)."""
    torch.manual_seed(0)
    head = Stage1Head(hidden, 0.3).to(device)
    model = maybe_compile(head, compiled)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    x = torch.randn(batch, hidden, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start) / steps)
    return statistics.median(times), first


def run_seconds(compiled: bool, args: argparse.Namespace, device: torch.device) -> float:
    g = torch.Generator().manual_seed(0)
    train = TensorSplit(torch.randn(args.n_train, args.hidden, generator=g),
                        torch.randint(0, 2, (args.n_train,), generator=g))
    val = TensorSplit(torch.randn(1024, args.hidden, generator=g), torch.randint(0, 2, (1024,), generator=g))
    config = Stage1ProConfig(epochs=args.epochs, warmup_epochs=0, max_batch_size=args.batch, grad_accum_steps=1,
                             use_amp=False, compile_head=compiled)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train_head(config, train, val, Path(out), progress=False, device=device)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_train", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=768, help="feature size (768: DINOv3 ViT-B)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, hidden {args.hidden}, "
          f"batch {args.batch}")
    eager_ms, eager_first = step_ms(False, args.hidden, args.batch, device, args.steps, args.repeats)
    compiled_ms, compiled_first = step_ms(True, args.hidden, args.batch, device, args.steps, args.repeats)
    print(f"steady state: eager {eager_ms:.3f} ms/step, compiled {compiled_ms:.3f} ms/step, "
          f"speed-up x{eager_ms / compiled_ms:.2f}")
    print(f"first step: eager {eager_first:.2f} s, compiled {compiled_first:.2f} s (compilation)")
    eager_s, compiled_s = run_seconds(False, args, device), run_seconds(True, args, device)
    print(f"train_head, {args.epochs} epochs of {args.n_train} samples: eager {eager_s:.1f} s, "
          f"compiled {compiled_s:.1f} s, ratio compiled/eager {compiled_s / eager_s:.2f}")


if __name__ == "__main__":
    main()
