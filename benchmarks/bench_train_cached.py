"""``train_cached`` speed: our trainer against a per-batch DataLoader loop written like the baseline.

Same features, labels, head, optimiser, schedule, EMA, batch size and epochs. The baseline-style
loop is the old script's ``train_with_cached_features``: a ``TensorDataset`` behind a shuffling
``DataLoader``, ``.item()`` per batch, validation through a second ``DataLoader`` with softmax,
ECE and exit metrics in NumPy, the best head saved with ``torch.save``. Ours is
:func:`stage1_core.training.trainer.train_head` on a ``TensorSplit`` (it also writes a full
checkpoint, the CSV log and selective metrics every epoch). ``grad_accum_steps=1`` as in the
baseline's cached mode; AMP off (CPU).

    python benchmarks/bench_train_cached.py [--n_train 4096] [--n_val 1024] [--hidden 192] [--epochs 5]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stage1_core.config import Stage1ProConfig
from stage1_core.features import TensorSplit
from stage1_core.metrics.calibration import compute_ece
from stage1_core.training.trainer import train_head


class BaselineEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay, self.shadow, self.backup = model, decay, {}, {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.shadow[name] = param.data.clone()

    def update(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.shadow[name] = ((1.0 - self.decay) * param.data + self.decay * self.shadow[name]).clone()

    def apply_shadow(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.backup[name] = param.data
                param.data = self.shadow[name]

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.data = self.backup[name]
        self.backup = {}


def baseline_loop(config: Stage1ProConfig, train: TensorSplit, val: TensorSplit, out: Path) -> None:
    device = "cpu"
    torch.manual_seed(config.seed)
    train_ds, val_ds = TensorDataset(train.features, train.labels), TensorDataset(val.features, val.labels)
    counts = np.bincount(train.labels.numpy())
    weights = torch.FloatTensor(len(train.labels) / (len(counts) * counts + 1e-6))
    head = nn.Sequential(nn.Linear(train.hidden_size, 768), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(768, 2))
    train_loader = DataLoader(train_ds, batch_size=config.max_batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_ds, batch_size=config.max_batch_size, shuffle=False)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr_head, weight_decay=config.weight_decay)
    total, warmup = config.epochs * len(train_loader), config.warmup_epochs * len(train_loader)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    ema = BaselineEMA(head, config.ema_decay)
    best = 0.0
    for _ in range(config.epochs):
        head.train()
        train_loss, train_correct = 0.0, 0
        for features, labels in train_loader:
            features, labels = features.to(device), labels.to(device)
            logits = head(features)
            loss = criterion(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            ema.update()
            train_loss += loss.item()
            train_correct += logits.argmax(1).eq(labels).sum().item()
        ema.apply_shadow()
        head.eval()
        val_correct, probs_list, labels_list = 0, [], []
        with torch.no_grad():
            for features, labels in val_loader:
                logits = head(features)
                probs_list.append(torch.softmax(logits, dim=1).numpy())
                labels_list.append(labels.numpy())
                val_correct += logits.argmax(1).eq(labels).sum().item()
        ema.restore()
        val_acc = 100.0 * val_correct / len(val_ds)
        probs, labels_np = np.concatenate(probs_list), np.concatenate(labels_list)
        compute_ece(probs, labels_np)
        exit_mask = (probs[:, 1] >= 0.88) | (probs[:, 1] <= 0.12)
        if exit_mask.sum() > 0:
            ((probs[exit_mask][:, 1] > 0.5).astype(int) == labels_np[exit_mask]).mean()
        if val_acc > best:
            best = val_acc
            ema.apply_shadow()
            torch.save(head.state_dict(), out / "classifier_head.pth")
            ema.restore()


def make_data(n: int, hidden: int, seed: int, name: str) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden, generator=g)
    features = torch.randn(n, hidden, generator=g)
    labels = (features @ direction / math.sqrt(hidden) + 0.5 * torch.randn(n, generator=g) > -0.85).long()
    return TensorSplit(features, labels, None, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_train", type=int, default=4096)
    parser.add_argument("--n_val", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=192, help="feature size (192 = builtin tiny-dinov3)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    train, val = make_data(args.n_train, args.hidden, 0, "train"), make_data(args.n_val, args.hidden, 1, "val_select")
    config = Stage1ProConfig(
        epochs=args.epochs, max_batch_size=args.batch, fallback_batch_size=min(32, args.batch), grad_accum_steps=1,
        use_amp=False, early_stop_patience=args.epochs + 1, compile_head=False,
    )
    work = Path(tempfile.mkdtemp(prefix="bench_train_cached_"))
    times: dict[str, list[float]] = {"ours": [], "baseline-style": []}
    try:
        train_head(config.with_updates(epochs=1, warmup_epochs=0), train, val, work / "warmup", progress=False)
        for r in range(args.repeats):
            start = time.perf_counter()
            train_head(config, train, val, work / f"ours{r}", progress=False)
            times["ours"].append(time.perf_counter() - start)
            (work / f"base{r}").mkdir()
            start = time.perf_counter()
            baseline_loop(config, train, val, work / f"base{r}")
            times["baseline-style"].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, base = min(times["ours"]), min(times["baseline-style"])
    print(f"train {args.n_train} x {args.hidden}, val {args.n_val}, batch {args.batch}, epochs {args.epochs}, "
          f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, repeats {args.repeats} (best kept)")
    print(f"          ours (train_head): {ours:7.3f} s")
    print(f"  baseline-style DataLoader: {base:7.3f} s")
    print(f"speed-up ours vs baseline-style = {base / ours:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
