"""Trainer: learning, gradient accumulation, exact resume, selection, early stopping, outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_core.config import Stage1ProConfig
from stage1_core.data.loaders import make_dataloader
from stage1_core.features import TensorSplit
from stage1_core.model.backbone import DINOv3Backbone
from stage1_core.model.head import Stage1Head, load_head_state_dict
from stage1_core.training.checkpoints import load_checkpoint, load_state_dict_file
from stage1_core.training.logging_csv import BASELINE_HEADER
from stage1_core.acceptance.standing import check_selected_checkpoint_is_best
from stage1_core.calibration.threshold_sweep import certify_score_threshold, certify_softmax_threshold
from stage1_core.metrics.selective import selective_metrics
from stage1_core.training.trainer import TrainingError, certified_coverage, predict_logits, train_head
from tests.unit.test_backbone import save_small_backbone
from tests.unit.test_features import TinyImages

HIDDEN = 16


def make_config(**overrides) -> Stage1ProConfig:
    values = dict(
        epochs=4, warmup_epochs=1, max_batch_size=16, grad_accum_steps=2, lr_head=3e-3,
        early_stop_patience=10, seed=7, dropout=0.3, use_amp=False,
    )
    values.update(overrides)
    values.setdefault("fallback_batch_size", min(8, values["max_batch_size"]))
    return Stage1ProConfig(**values)


def make_split(n: int, seed: int, name: str) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    direction = torch.linspace(-1, 1, HIDDEN)
    features = torch.randn(n, HIDDEN, generator=g)
    labels = ((features @ direction + 0.3 * torch.randn(n, generator=g)) > -0.8).long()
    return TensorSplit(features, labels, tuple(f"{name}{i}" for i in range(n)), name)


@pytest.fixture(scope="module")
def data() -> tuple[TensorSplit, TensorSplit]:
    return make_split(128, 0, "t"), make_split(64, 1, "v")


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


def test_head_learns_a_linear_problem(tmp_path):
    train, val = make_split(512, 0, "t"), make_split(256, 1, "v")
    result = train_head(make_config(epochs=6, max_batch_size=32), train, val, tmp_path, progress=False)
    assert result.losses_finite and result.epochs_run == 6 and result.global_step == 6 * 8
    assert result.best_metric >= 0.88, [row["val_acc"] for row in result.history]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_checkpoint == tmp_path / "model_best.pth"


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data):
    train, val = data

    def mean_ce(output, labels):
        return F.cross_entropy(output, labels)

    common = dict(epochs=2, dropout=0.0, use_ema=False)
    small = train_head(make_config(max_batch_size=8, grad_accum_steps=2, **common), train, val, tmp_path / "a",
                       progress=False, loss_fn=mean_ce)
    big = train_head(make_config(max_batch_size=16, grad_accum_steps=1, **common), train, val, tmp_path / "b",
                     progress=False, loss_fn=mean_ce)
    assert small.global_step == big.global_step == 2 * 8
    a = load_checkpoint(small.last_checkpoint)["model_state_dict"]
    b = load_checkpoint(big.last_checkpoint)["model_state_dict"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_partial_accumulation_group_steps_at_epoch_end(tmp_path, data):
    train, val = data
    # 128 samples / batch 16 = 8 batches; accumulation 3 -> groups of 3, 3, 2 -> 3 steps per epoch
    result = train_head(make_config(epochs=2, grad_accum_steps=3), train, val, tmp_path, progress=False)
    assert result.global_step == 6
    assert load_checkpoint(result.last_checkpoint)["scheduler_state_dict"]["last_epoch"] == 6


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data):
    train, val = data
    config = make_config(epochs=4)
    full = train_head(config, train, val, tmp_path / "full", progress=False)
    first = train_head(config, train, val, tmp_path / "resumed", progress=False, stop_after_epoch=2)
    assert first.epochs_run == 2
    resumed = train_head(config, train, val, tmp_path / "resumed", progress=False,
                         resume_checkpoint=first.last_checkpoint)
    assert resumed.epochs_run == 4 and resumed.global_step == full.global_step
    a, b = load_checkpoint(full.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    for key in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][key], b["model_state_dict"][key]), key
    assert set(a["ema_state_dict"]) == set(b["ema_state_dict"])
    for key in a["ema_state_dict"]:
        assert torch.equal(a["ema_state_dict"][key], b["ema_state_dict"][key]), key
    for sa, sb in zip(a["optimizer_state_dict"]["state"].values(), b["optimizer_state_dict"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    best_a, best_b = load_state_dict_file(full.best_checkpoint), load_state_dict_file(resumed.best_checkpoint)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert _without_time(full.history) == _without_time(resumed.history)
    assert (resumed.best_epoch, resumed.best_metric) == (full.best_epoch, full.best_metric)

    def rows(path):
        with open(path) as handle:
            return [r[:-1] for r in csv.reader(handle)]  # drop Epoch_Seconds

    assert rows(full.log_csv) == rows(resumed.log_csv)


def test_csv_log_keeps_the_baseline_header_first(tmp_path, data):
    train, val = data
    result = train_head(make_config(epochs=2), train, val, tmp_path, progress=False)
    with open(result.log_csv) as handle:
        header, *rows = list(csv.reader(handle))
    assert tuple(header[: len(BASELINE_HEADER)]) == BASELINE_HEADER
    assert {"AUGRC", "AURC", "Risk@0.8", "Coverage@0.02", "Epoch_Seconds"} <= set(header)
    assert "GateCoverage" not in header  # no gate, no gate columns
    assert len(rows) == 2 and rows[1][0] == "2"
    best = max(float(r[header.index("Val_Acc")]) for r in rows)
    assert float(rows[-1][header.index("Best_Val_Acc")]) == pytest.approx(best)
    assert result.log_csv == tmp_path / "training.log"


def test_augrc_selection_keeps_the_accuracy_best_head_too(tmp_path, data):
    train, val = data
    result = train_head(make_config(epochs=3), train, val, tmp_path, progress=False, selection_metric="augrc")
    assert result.selection_metric == "augrc"
    augrcs = [row["sel_augrc"] for row in result.history]
    assert result.best_metric == pytest.approx(min(augrcs))
    assert result.best_epoch == 1 + augrcs.index(min(augrcs))
    assert result.accuracy_best_checkpoint == tmp_path / "model_best_accuracy.pth"
    assert result.accuracy_best_checkpoint.is_file()
    with pytest.raises(TrainingError, match="selection_metric"):
        train_head(make_config(), train, val, tmp_path, progress=False, selection_metric="loss")


def test_certified_coverage_selection_keeps_the_epoch_that_certifies_most(tmp_path, data):
    train, val = data
    result = train_head(make_config(epochs=3), train, val, tmp_path, progress=False, selection_metric="certified_coverage")
    covered = [row["certified_coverage"] for row in result.history]
    assert result.best_metric == pytest.approx(max(covered))
    tied = [row for row in result.history if row["certified_coverage"] == max(covered)]
    assert result.best_epoch == max(tied, key=lambda row: row["val_acc"])["epoch"]  # ties: the more accurate
    with open(result.log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(row["Certified_Coverage"]) for row in rows]
    assert logged == pytest.approx(covered, abs=1e-6)
    assert check_selected_checkpoint_is_best(rows, result.best_epoch, "certified_coverage").passed
    assert not check_selected_checkpoint_is_best([{**rows[0], "Certified_Coverage": "0.5"},
                                                  {**rows[0], "Epoch": "2", "Certified_Coverage": "0.6"}],
                                                 1, "certified_coverage").passed


def test_certified_coverage_ties_go_to_the_more_accurate_epoch(tmp_path, data, monkeypatch):
    """Early epochs often certify nothing on val_select: among equal coverages the more accurate
    epoch is kept, not the first."""
    import stage1_core.training.trainer as trainer

    monkeypatch.setattr(trainer, "certified_coverage", lambda *args: 0.0)
    train, val = data
    result = train_head(make_config(epochs=4), train, val, tmp_path, progress=False, selection_metric="certified_coverage")
    accuracies = [row["val_acc"] for row in result.history]
    assert result.best_metric == 0.0
    assert result.best_epoch == 1 + accuracies.index(max(accuracies))


def test_an_accuracy_band_keeps_the_best_coverage_among_accurate_epochs(tmp_path, data, monkeypatch):
    """selection_accuracy_tolerance: the kept epoch is the one the pure rule picks from the logged
    history, its weights are that epoch's (its val_select accuracy is reproduced from the file), and
    only candidates a later epoch could still choose stay on disk."""
    import itertools

    import stage1_core.training.trainer as trainer
    from stage1_core.training.selection import EpochScore, choose_epoch, live_candidates

    coverages = itertools.cycle([0.9, 0.4, 0.7, 0.6, 0.8])
    monkeypatch.setattr(trainer, "certified_coverage", lambda *args: next(coverages))
    train, val = data
    config = make_config(epochs=5, selection_accuracy_tolerance=0.02)
    result = train_head(config, train, val, tmp_path, progress=False, selection_metric="certified_coverage")
    run = [EpochScore(r["epoch"], r["certified_coverage"], r["val_acc"]) for r in result.history]
    assert result.best_epoch == choose_epoch(run, True, 0.02, ties_by_accuracy=True)
    chosen = next(r for r in result.history if r["epoch"] == result.best_epoch)
    head = trainer.load_head(result.best_checkpoint, HIDDEN)
    with torch.no_grad():
        accuracy = (head(val.features).argmax(dim=1) == val.labels).float().mean().item()
    assert accuracy == pytest.approx(chosen["val_acc"])
    kept = {int(p.stem.rsplit("epoch", 1)[1]) for p in (tmp_path / "selection_candidates").glob("head_epoch*.pth")}
    assert kept == live_candidates(run, True, 0.02, ties_by_accuracy=True)
    assert result.best_epoch in kept


def _two_class_probs(predictions: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    p1 = np.where(predictions == 1, confidence, 1.0 - confidence)
    return np.stack([1.0 - p1, p1], axis=1)


def test_certified_coverage_is_the_certificate_of_the_policys_exit_score():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 600)
    confidence = rng.uniform(0.5, 1.0, 600)
    predictions = np.where(rng.random(600) < 0.97, labels, 1 - labels)
    probs = _two_class_probs(predictions, confidence)
    softmax = certify_softmax_threshold(probs, labels, 0.02, 0.1)
    assert certified_coverage(probs, labels, None, 0.02, 0.1) == pytest.approx(softmax.coverage)
    gate = torch.as_tensor(rng.normal(size=600))  # a gated head is certified on its gate's order, not on max(p)
    by_gate = certify_score_threshold(gate.numpy(), predictions, labels, 0.02, 0.1)
    assert certified_coverage(probs, labels, gate, 0.02, 0.1) == pytest.approx(by_gate.coverage)


def test_augrc_can_prefer_the_head_that_certifies_nothing_at_the_operating_point():
    """Why phases 2+ select by certified coverage: AUGRC weighs every error at every coverage, the
    promise only false negatives among exits. Head A misses 30 positives spread over its confidence
    range; head B calls 60 confident negatives roadwork. AUGRC prefers A; at FNR on exits <= 2%
    A certifies nothing and B everything."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 500)
    confidence = rng.permutation(np.linspace(0.6, 0.999, 1000))
    positives = np.flatnonzero(labels == 1)
    positives = positives[np.argsort(confidence[positives])]
    negatives = np.flatnonzero(labels == 0)
    negatives = negatives[np.argsort(-confidence[negatives])]
    head_a, head_b = labels.copy(), labels.copy()
    head_a[positives[::17][:30]] = 0
    head_b[negatives[:60]] = 1
    probs_a, probs_b = _two_class_probs(head_a, confidence), _two_class_probs(head_b, confidence)
    augrc_a = selective_metrics(probs_a.max(axis=1), (head_a != labels).astype(float))["augrc"]
    augrc_b = selective_metrics(probs_b.max(axis=1), (head_b != labels).astype(float))["augrc"]
    assert augrc_a < augrc_b
    assert certified_coverage(probs_a, labels, None, 0.02, 0.1) == 0.0
    assert certified_coverage(probs_b, labels, None, 0.02, 0.1) == 1.0


def test_early_stopping_on_no_improvement(tmp_path, data):
    train, val = data
    # With a negligible learning rate the EMA-evaluated accuracy never strictly improves after epoch 1.
    config = make_config(epochs=6, lr_head=1e-9, early_stop_patience=2)
    result = train_head(config, train, val, tmp_path, progress=False)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert load_checkpoint(result.last_checkpoint)["patience_counter"] == 2


def test_non_finite_loss_stops_without_a_checkpoint_of_that_epoch(tmp_path, data):
    train, val = data

    def broken(output, labels):
        return F.cross_entropy(output, labels) * float("nan")

    result = train_head(make_config(epochs=3), train, val, tmp_path, progress=False, loss_fn=broken)
    assert result.losses_finite is False and result.epochs_run == 0 and result.best_checkpoint is None


def test_a_leftover_best_checkpoint_is_never_taken_as_this_runs_best(tmp_path, data):
    train, val = data
    first = train_head(make_config(epochs=2), train, val, tmp_path, progress=False)
    assert first.best_checkpoint is not None and first.best_checkpoint.is_file()

    def broken(output, labels):
        return F.cross_entropy(output, labels) * float("nan")

    again = train_head(make_config(epochs=2), train, val, tmp_path, progress=False, loss_fn=broken)
    assert again.best_checkpoint is None and not (tmp_path / "model_best.pth").exists()


def test_best_checkpoint_holds_ema_weights_and_predicts(tmp_path, data):
    train, val = data
    result = train_head(make_config(epochs=3), train, val, tmp_path, progress=False)
    state = load_state_dict_file(result.best_checkpoint)
    assert list(state) == ["input_mean", "input_std", "trunk.0.weight", "trunk.0.bias", "cls.weight", "cls.bias"]
    if result.best_epoch == result.epochs_run:
        shadow = load_checkpoint(result.last_checkpoint)["ema_state_dict"]
        assert set(shadow) == set(state) - {"input_mean", "input_std"}
        assert all(torch.equal(state[k], shadow[k]) for k in shadow)
    logits = predict_logits(result.best_checkpoint, val)
    head = Stage1Head(HIDDEN).eval()
    load_head_state_dict(head, state)
    with torch.no_grad():
        assert torch.allclose(logits, head(val.features), atol=1e-6)
    accuracy = (logits.argmax(1) == val.labels).float().mean().item()
    assert accuracy == pytest.approx(result.history[result.best_epoch - 1]["val_acc"])


def test_train_mode_runs_the_frozen_backbone_each_step_and_resumes(tmp_path):
    backbone = DINOv3Backbone.load(save_small_backbone(tmp_path / "bb"))
    fingerprint = backbone.fingerprint()
    train_set, val_set = TinyImages(32, seed=0), TinyImages(16, seed=1, prefix="v")

    def loaders():
        return (make_dataloader(train_set, 8, train=True, num_workers=0, seed=3),
                make_dataloader(val_set, 8, train=False, num_workers=0))

    config = make_config(epochs=3, max_batch_size=8)
    passes = backbone.forward_passes
    full = train_head(config, *loaders(), tmp_path / "full", backbone=backbone, progress=False)
    assert full.losses_finite and full.global_step == 3 * 2 and full.hidden_size == 32
    assert backbone.forward_passes - passes == 3 * 4 + 2  # train batches every epoch + val once
    assert backbone.fingerprint(refresh=True) == fingerprint and not backbone.trainable_parameters()
    train_head(config, *loaders(), tmp_path / "resumed", backbone=backbone, progress=False, stop_after_epoch=1)
    resumed = train_head(config, *loaders(), tmp_path / "resumed", backbone=backbone, progress=False,
                         resume_checkpoint=tmp_path / "resumed" / "checkpoint_last.pth")
    a, b = load_checkpoint(full.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    with pytest.raises(TrainingError, match="needs the backbone"):
        train_head(config, *loaders(), tmp_path / "x", progress=False)


def test_fsam_trains_with_two_passes_per_step_and_resumes_exactly(tmp_path, data):
    train, val = data
    config = make_config(epochs=3, phase=5, optimizer="fsam", sam_rho=0.05)
    full = train_head(config, train, val, tmp_path / "full", progress=False)
    steps = 3 * 4  # 128 samples / 16 per batch / 2 per accumulation group
    assert full.losses_finite and full.global_step == steps
    assert len(full.grad_norms) == len(full.step_losses) == steps and all(v > 0 for v in full.grad_norms)
    adamw = train_head(make_config(epochs=3), train, val, tmp_path / "adamw", progress=False)
    a_adamw = load_checkpoint(adamw.last_checkpoint)["model_state_dict"]
    a_fsam = load_checkpoint(full.last_checkpoint)["model_state_dict"]
    assert any(not torch.equal(a_adamw[k], a_fsam[k]) for k in a_adamw)  # the perturbed gradient was used
    train_head(config, train, val, tmp_path / "resumed", progress=False, stop_after_epoch=1)
    resumed = train_head(config, train, val, tmp_path / "resumed", progress=False,
                         resume_checkpoint=tmp_path / "resumed" / "checkpoint_last.pth")
    a, b = load_checkpoint(full.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert resumed.grad_norms == full.grad_norms and resumed.step_losses == full.step_losses


def test_init_head_state_warm_starts_the_head(tmp_path, data):
    train, val = data
    first = train_head(make_config(epochs=2), train, val, tmp_path / "a", progress=False)
    state = load_state_dict_file(first.best_checkpoint)
    warm = train_head(make_config(epochs=1, warmup_epochs=0, lr_head=1e-9, use_ema=False), train, val, tmp_path / "b",
                      progress=False, init_head_state=state)
    after = load_state_dict_file(warm.best_checkpoint)
    assert all(torch.allclose(state[k], after[k], atol=1e-6) for k in state)


def test_select_from_start_keeps_the_starting_head_when_no_epoch_beats_it(tmp_path, data):
    train, val = data
    start = load_state_dict_file(train_head(make_config(epochs=3), train, val, tmp_path / "a", progress=False).best_checkpoint)

    def flipped(output, labels):  # training that can only make the head worse on val_select
        return F.cross_entropy(output, 1 - labels)

    config = make_config(epochs=2, lr_head=3e-2, use_ema=False)
    kept = train_head(config, train, val, tmp_path / "b", progress=False, init_head_state=start, loss_fn=flipped,
                      select_from_start=True)
    assert kept.best_epoch == 0 and kept.epochs_run == 2 and [row["epoch"] for row in kept.history] == [0, 1, 2]
    assert kept.history[0]["train_loss"] is None and kept.history[0]["val_acc"] > kept.history[-1]["val_acc"]
    saved = load_state_dict_file(kept.best_checkpoint)
    assert all(torch.equal(start[k], saved[k]) for k in start)
    with open(kept.log_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["Epoch"] == "0" and rows[0]["Train_Loss"] == "nan" and len(rows) == 3

    plain = train_head(config, train, val, tmp_path / "c", progress=False, init_head_state=start, loss_fn=flipped)
    assert plain.best_epoch == 1 and [row["epoch"] for row in plain.history] == [1, 2]

    # The epoch-0 row and the start's standing survive an interruption: resume equals one run.
    train_head(config, train, val, tmp_path / "d", progress=False, init_head_state=start, loss_fn=flipped,
               select_from_start=True, stop_after_epoch=1)
    resumed = train_head(config, train, val, tmp_path / "d", progress=False, init_head_state=start, loss_fn=flipped,
                         select_from_start=True, resume_checkpoint=tmp_path / "d" / "checkpoint_last.pth")
    assert resumed.best_epoch == 0 and _without_time(resumed.history) == _without_time(kept.history)


def test_fine_tuning_trains_adapters_with_the_head_saves_them_and_resumes_exactly(tmp_path):
    from stage1_core.model.peft import apply_dora, trainable_parameter_report
    from stage1_core.training.trainer import BEST_ADAPTERS_FILE

    def adapted():
        backbone = DINOv3Backbone.load(save_small_backbone(tmp_path / "bb"))
        return apply_dora(backbone, 2, 1)

    train_set, val_set = TinyImages(32, seed=0), TinyImages(16, seed=1, prefix="v")

    def loaders():
        return (make_dataloader(train_set, 8, train=True, num_workers=0, seed=3),
                make_dataloader(val_set, 8, train=False, num_workers=0))

    config = make_config(epochs=2, max_batch_size=8, lr_backbone=1e-2, layer_lr_decay=0.5)
    backbone = adapted()
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
    full = train_head(config, *loaders(), tmp_path / "full", backbone=backbone, progress=False)
    assert full.best_adapters == tmp_path / "full" / BEST_ADAPTERS_FILE
    saved = load_state_dict_file(full.best_adapters)
    assert set(saved) == set(before) and trainable_parameter_report(backbone.model)["trainable"] > 0
    assert any(not torch.equal(saved[k], before[k]) for k in saved)  # the adapters trained
    assert full.peak_rss_gb is not None and full.peak_rss_gb > 0
    train_head(config, *loaders(), tmp_path / "resumed", backbone=adapted(), progress=False, stop_after_epoch=1)
    resumed_backbone = adapted()
    train_head(config, *loaders(), tmp_path / "resumed", backbone=resumed_backbone, progress=False,
               resume_checkpoint=tmp_path / "resumed" / "checkpoint_last.pth")
    a = load_checkpoint(full.last_checkpoint)["backbone_trainable_state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pth")["backbone_trainable_state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_head_standardizes_with_the_training_features_unless_warm_started_or_off(tmp_path):
    train, val = make_split(128, 0, "t"), make_split(64, 1, "v")
    scaled = TensorSplit(train.features * 50 + 7, train.labels, train.sample_ids, "t")
    scaled_val = TensorSplit(val.features * 50 + 7, val.labels, val.sample_ids, "v")
    result = train_head(make_config(epochs=1, warmup_epochs=0), scaled, scaled_val, tmp_path / "on", progress=False)
    state = load_state_dict_file(result.best_checkpoint)
    torch.testing.assert_close(state["input_mean"], scaled.features.mean(0))
    torch.testing.assert_close(state["input_std"], scaled.features.std(0))
    # A warm start keeps the statistics of the head it starts from (here: other features).
    warm = train_head(make_config(epochs=1, warmup_epochs=0), train, val, tmp_path / "warm", progress=False, init_head_state=state)
    assert torch.equal(load_state_dict_file(warm.best_checkpoint)["input_mean"], state["input_mean"])
    off = train_head(make_config(epochs=1, warmup_epochs=0, standardize_features=False), scaled, scaled_val, tmp_path / "off",
                     progress=False)
    off_state = load_state_dict_file(off.best_checkpoint)
    assert torch.equal(off_state["input_mean"], torch.zeros(HIDDEN)) and torch.equal(off_state["input_std"], torch.ones(HIDDEN))


def test_peak_memory_reset_describes_one_training_run_not_the_process_lifetime():
    """Steps share a process under the in-process executor: an earlier step's peak must not leak in."""
    import os

    from stage1_core.training.trainer import peak_rss_gb, reset_peak_memory

    baseline = peak_rss_gb()
    ballast = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB touched
    ballast[::4096] = 2
    after_ballast = peak_rss_gb()
    assert after_ballast > baseline + 0.05
    del ballast
    reset_peak_memory(torch.device("cpu"))
    if os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status"):
        assert peak_rss_gb() < after_ballast - 0.05  # Linux: the peak starts afresh
    else:
        assert peak_rss_gb() >= after_ballast - 1e-6  # elsewhere: the documented process-lifetime peak


def test_gate_margin_input_trains_the_gate_margin_weights_only_when_on(tmp_path):
    from stage1_core.training.recipes import build_loss

    train, val = make_split(256, 0, "t"), make_split(64, 1, "v")
    weights = {}
    for on in (False, True):
        config = make_config(epochs=2, max_batch_size=32, gate_margin_input=on, gate_correct_weight=1.0)
        result = train_head(config, train, val, tmp_path / str(on), progress=False, with_gate=True,
                            loss_fn=build_loss("selective", config, train.labels))
        weights[on] = load_state_dict_file(result.best_checkpoint)["gate_margin.weight"]
        with open(result.log_csv) as handle:
            header, *rows = list(csv.reader(handle))
        assert header[len(BASELINE_HEADER):len(BASELINE_HEADER) + 2] == ["GateCoverage", "GateAcc"]
        for row, record in zip(rows, result.history, strict=True):
            assert float(row[header.index("GateCoverage")]) == pytest.approx(100 * record["gate_coverage"], abs=0.05)
            assert 0.0 <= record["gate_coverage"] <= 1.0
    assert torch.equal(weights[False], torch.zeros(2))
    assert weights[True].abs().sum() > 0


def test_validation_metrics_report_the_raw_gates_coverage_and_accuracy_on_what_it_accepts():
    from stage1_core.training.trainer import _validation_metrics

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])  # rows 0-1 right, rows 2-3 wrong
    gate = torch.tensor([3.0, 1.0, 0.5, -2.0])  # accepts rows 0-2
    out = _validation_metrics(logits, labels, torch.nn.CrossEntropyLoss(), 0.88, gate)
    assert out["gate_coverage"] == pytest.approx(0.75) and out["gate_acc"] == pytest.approx(2 / 3)
    nothing = _validation_metrics(logits, labels, torch.nn.CrossEntropyLoss(), 0.88, torch.full((4,), -5.0))
    assert nothing["gate_coverage"] == 0.0 and nothing["gate_acc"] is None
    assert "gate_coverage" not in _validation_metrics(logits, labels, torch.nn.CrossEntropyLoss(), 0.88)


def test_save_every_epoch_keeps_each_epochs_full_checkpoint_and_a_new_run_drops_old_ones(tmp_path, data):
    train, val = data
    result = train_head(make_config(epochs=2, save_every_epoch=True), train, val, tmp_path, progress=False)
    assert [p.name for p in result.epoch_checkpoints] == ["checkpoint_epoch1.pth", "checkpoint_epoch2.pth"]
    first = load_checkpoint(tmp_path / "checkpoint_epoch1.pth")
    assert first["epoch"] == 0 and set(first) >= {"model_state_dict", "optimizer_state_dict", "ema_state_dict"}
    assert (tmp_path / "checkpoint_epoch2.pth").read_bytes() == result.last_checkpoint.read_bytes()
    again = train_head(make_config(epochs=1, warmup_epochs=0), train, val, tmp_path, progress=False)
    assert again.epoch_checkpoints == [] and not list(tmp_path.glob("checkpoint_epoch*.pth"))


def test_memory_warning_only_near_the_device_limit():
    from stage1_core.training.trainer import memory_warning

    assert memory_warning(10.0, 80.0, "cuda") is None and memory_warning(None, 80.0, "cuda") is None
    assert memory_warning(10.0, None, "cpu") is None
    message = memory_warning(75.0, 80.0, "cuda")
    assert "75.00 GiB" in message and "94%" in message and "max_batch_size" in message
