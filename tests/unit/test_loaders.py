"""Batch-size probing and the DataLoader policy."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from stage1_core.data import loaders
from stage1_core.data.loaders import make_dataloader, pick_batch_size, resolve_num_workers


class _MemoryLimitedModel(torch.nn.Module):
    """Raises CUDA OOM for batches larger than ``limit``; records the batch sizes it saw."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x.flatten(1).sum(1) * self.weight


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pretend CUDA is available; count ``empty_cache`` calls."""
    freed: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    return freed


def _cpu_batch(n: int) -> torch.Tensor:
    return torch.zeros(n, 3, 8, 8)


def test_cpu_returns_max_without_probing() -> None:
    model = _MemoryLimitedModel(limit=0)
    assert pick_batch_size(model, 64, 32, "cpu") == 64
    assert model.seen == []


def test_cuda_device_without_cuda_returns_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _MemoryLimitedModel(limit=0)
    assert pick_batch_size(model, 64, 32, torch.device("cuda")) == 64
    assert model.seen == []


def test_cuda_max_fits(fake_cuda: list[int]) -> None:
    model = _MemoryLimitedModel(limit=64)
    assert pick_batch_size(model, 64, 32, "cuda", make_batch=_cpu_batch) == 64
    assert model.seen == [64]


def test_cuda_oom_falls_back_and_frees_cache(fake_cuda: list[int]) -> None:
    model = _MemoryLimitedModel(limit=40)
    assert pick_batch_size(model, 64, 32, "cuda", make_batch=_cpu_batch) == 32
    assert model.seen == [64, 32]
    assert len(fake_cuda) >= 1


def test_cuda_oom_on_fallback_too_raises(fake_cuda: list[int]) -> None:
    model = _MemoryLimitedModel(limit=8)
    with pytest.raises(RuntimeError, match="fallback batch size 32"):
        pick_batch_size(model, 64, 32, "cuda", make_batch=_cpu_batch)


def test_backward_probe_runs_backward_and_clears_grads(fake_cuda: list[int]) -> None:
    model = _MemoryLimitedModel(limit=64)
    calls: list[bool] = []
    model.weight.register_hook(lambda grad: calls.append(True))
    assert pick_batch_size(model, 16, 8, "cuda", make_batch=_cpu_batch, backward=True) == 16
    assert calls == [True] and model.weight.grad is None


def test_default_probe_batch_shape(monkeypatch: pytest.MonkeyPatch, fake_cuda: list[int]) -> None:
    made: list[tuple] = []
    real_zeros = torch.zeros

    def zeros_on_cpu(shape, dtype=None, device=None):
        made.append((tuple(shape), dtype, torch.device(device).type))
        return real_zeros(shape, dtype=dtype)

    monkeypatch.setattr(loaders.torch, "zeros", zeros_on_cpu)
    model = _MemoryLimitedModel(limit=4).double()
    assert pick_batch_size(model, 8, 2, "cuda", sample_shape=(3, 16, 16)) == 2
    assert made == [((8, 3, 16, 16), torch.float64, "cuda"), ((2, 3, 16, 16), torch.float64, "cuda")]


def test_invalid_batch_sizes() -> None:
    with pytest.raises(ValueError, match="max_batch_size=0"):
        pick_batch_size(_MemoryLimitedModel(1), 0, 32, "cpu")


def _dataset(n: int = 20) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.arange(n) % 2)


def test_train_loader_shuffles_and_drops_last() -> None:
    loader = make_dataloader(_dataset(), batch_size=8, train=True, num_workers=0)
    assert isinstance(loader.sampler, RandomSampler) and loader.drop_last
    assert len(loader) == 2 and all(len(x) == 8 for x, _ in loader)
    assert not loader.pin_memory and not loader.persistent_workers


def test_eval_loader_keeps_order_and_every_sample() -> None:
    loader = make_dataloader(_dataset(), batch_size=8, train=False, num_workers=0)
    assert isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
    assert torch.cat([x for x, _ in loader]).tolist() == list(range(20))


def test_shuffle_order_is_seeded() -> None:
    def order(seed: int) -> list[int]:
        return torch.cat([x for x, _ in make_dataloader(_dataset(), 4, True, num_workers=0, seed=seed)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_pin_memory_only_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not make_dataloader(_dataset(), 4, False, num_workers=0, device="cuda").pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_dataloader(_dataset(), 4, False, num_workers=0, device="cuda").pin_memory
    assert not make_dataloader(_dataset(), 4, False, num_workers=0, device="cpu").pin_memory


def test_worker_count_bounded_by_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders.os, "cpu_count", lambda: 3)
    assert resolve_num_workers(16) == 3
    assert resolve_num_workers(2) == 2
    assert resolve_num_workers(None) == 3
    monkeypatch.setattr(loaders.os, "cpu_count", lambda: 64)
    assert resolve_num_workers(None) == loaders.DEFAULT_MAX_WORKERS
    monkeypatch.setattr(loaders.os, "cpu_count", lambda: None)
    assert resolve_num_workers(4) == 1
    with pytest.raises(ValueError, match="num_workers=-1"):
        resolve_num_workers(-1)


def test_persistent_workers_with_workers() -> None:
    loader = make_dataloader(_dataset(), batch_size=5, train=False, num_workers=1)
    assert loader.num_workers == 1 and loader.persistent_workers
    assert torch.cat([x for x, _ in loader]).tolist() == list(range(20))


def test_invalid_loader_arguments() -> None:
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        make_dataloader(_dataset(10), batch_size=32, train=True, num_workers=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_dataloader(_dataset(10), batch_size=0, train=False, num_workers=0)
    assert len(make_dataloader(_dataset(10), batch_size=32, train=False, num_workers=0)) == 1


# ----- ordered_thread_map (threaded image decoding) ----------------------------------------


def test_ordered_thread_map_keeps_order_and_hands_errors_to_the_consumer() -> None:
    import time

    def slow_square(x: int) -> int:
        if x == 3:
            raise ValueError("three is unreadable")
        time.sleep(0.02 * (x % 3))
        return x * x

    for workers in (0, 1, 3):
        out = list(loaders.ordered_thread_map(slow_square, range(8), workers=workers))
        assert [item for item, _, _ in out] == list(range(8))
        assert [value for _, value, error in out if error is None] == [x * x for x in range(8) if x != 3]
        ((item, value, error),) = [row for row in out if row[2] is not None]
        assert item == 3 and value is None and isinstance(error, ValueError)


def test_ordered_thread_map_reads_a_stream_only_a_bounded_way_ahead() -> None:
    import itertools
    import threading

    pulled = []
    lock = threading.Lock()

    def stream():
        for i in itertools.count():
            with lock:
                pulled.append(i)
            yield i

    results = loaders.ordered_thread_map(lambda x: x, stream(), workers=2, in_flight=5)
    first = [next(results) for _ in range(3)]
    assert [item for item, _, _ in first] == [0, 1, 2]
    assert len(pulled) <= 3 + 5
    results.close()
