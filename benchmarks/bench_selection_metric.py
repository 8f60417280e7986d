"""Checkpoint selection by AUGRC or by the coverage certified on val_select, on tuning seeds.

The product certifies one operating point (FNR on exits <= target_fnr_exit), and AUGRC averages
the selective risk over every coverage. This benchmark asks which of the two selection metrics
gives the checkpoint that certifies more on val_calib, and at what cost in accuracy; certified
coverage is also tried within accuracy bands (``selection_accuracy_tolerance``, ``--tolerances``). It reads a ``bench_seeds.py`` workdir whose
seeds ran the phase (their feature stores and challenge views) and trains the phase's head once
per selection metric on the same data, loss and seed. It then certifies the exit rule on
val_calib (max softmax for phase 2, the gate logit for phase 3; a monotone calibration keeps the
gate's order) and prints per seed and metric: the selected epoch, its val_select AUGRC and
certified coverage, and the coverage certified on val_calib.

val_test is never read. Run it on the tuning seeds (1001-1003) only, never on the fresh seeds
the README's benchmark reports.

    python benchmarks/bench_selection_metric.py --workdir /tmp/tune1k --seeds 1001 1002 1003 [--phase phase2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench_seeds import refuse_reported_seeds, use_seed

METRICS = ("augrc", "certified_coverage")


def variants(tolerances: list[float]) -> list[tuple[str, float | None]]:
    """(selection metric, accuracy tolerance) pairs: AUGRC, certified coverage, and certified
    coverage within each accuracy band."""
    return [(metric, None) for metric in METRICS] + [("certified_coverage", t) for t in tolerances]


def label(metric: str, tolerance: float | None) -> str:
    return metric if tolerance is None else f"{metric}, accuracy within {100 * tolerance:g} points"


def compare(seed_dir: Path, partition: str, out: Path, tolerances: list[float]) -> list[dict[str, Any]]:
    """One row per selection metric: selected epoch, val_select figures, val_calib certified coverage."""
    import torch

    from stage1_assets.demo import layout_and_config
    from stage1_core.bundle.predictor import Stage1Predictor
    from stage1_core.calibration.threshold_sweep import certify_score_threshold
    from stage1_core.data.splits import require_role
    from stage1_core.data.views import MultiViewSplit
    from stage1_core.phases import config_for_phase, get_recipe
    from stage1_core.policies import SoftmaxExitPolicy
    from stage1_core.steps.backbone import load_split
    from stage1_core.steps.data import read_splits
    from stage1_core.steps.deployment import training_views
    from stage1_core.training.recipes import build_loss
    from stage1_core.training.trainer import SELECTION_KEYS, load_head, train_head

    use_seed(seed_dir)
    layout, config = layout_and_config()
    cfg = config_for_phase(config, partition)
    recipe = get_recipe(partition)
    if recipe.train_mode == "finetune":
        raise SystemExit(f"{partition} fine-tunes the backbone; this benchmark compares cached-feature phases (2, 3)")
    splits, _ = read_splits(layout)
    train = load_split(layout, partition, "train")
    val_select = load_split(layout, partition, "val_select")
    val_calib = load_split(layout, partition, "val_calib")
    require_role(val_select.sample_ids, "select", splits, "val_select rows")
    require_role(val_calib.sample_ids, "calibrate", splits, "val_calib rows")
    views = training_views(layout, partition)
    if views:
        train = MultiViewSplit.of(train, views)
    rows = []
    for metric, tolerance in variants(tolerances):
        run_cfg = cfg.with_updates(selection_accuracy_tolerance=tolerance)
        result = train_head(run_cfg, train, val_select, out / label(metric, tolerance), selection_metric=metric,
                            progress=False, loss_fn=build_loss(recipe.loss_kind, cfg, train.labels),
                            with_gate=recipe.head_kind == "gated")
        chosen = next(r for r in result.history if r["epoch"] == result.best_epoch)
        predictor = Stage1Predictor(load_head(result.best_checkpoint, result.hidden_size), SoftmaxExitPolicy(None))
        logits, gates = predictor.head_outputs_from_features(val_calib.features)
        probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
        scores = probs.max(axis=1) if gates is None else gates
        cert = certify_score_threshold(scores, probs.argmax(axis=1), val_calib.labels.numpy(),
                                       cfg.target_fnr_exit, cfg.delta)
        rows.append({"seed": seed_dir.name, "phase": partition, "selection_metric": label(metric, tolerance),
                     "epoch": int(result.best_epoch), "selected_by": float(chosen[SELECTION_KEYS[metric]]),
                     "val_select_augrc": float(chosen["sel_augrc"]),
                     "val_select_certified_coverage": float(chosen["certified_coverage"]),
                     "val_calib_certified_coverage": float(cert.coverage),
                     "val_calib_accuracy": float((probs.argmax(axis=1) == val_calib.labels.numpy()).mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a bench_seeds.py workdir")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1001, 1002, 1003])
    parser.add_argument("--phase", default="phase2")
    parser.add_argument("--tolerances", nargs="*", type=float, default=[0.01],
                        help="accuracy bands (fractions) for certified-coverage selection")
    args = parser.parse_args()
    refuse_reported_seeds(args.seeds)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows += compare(args.workdir / f"seed_{seed}", args.phase, Path(tmp) / str(seed), args.tolerances)
    print("| seed | selection | epoch | val_select AUGRC | val_select certified coverage | val_calib certified coverage "
          "| val_calib accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['selection_metric']} | {r['epoch']} | {r['val_select_augrc']:.4f} | "
              f"{100 * r['val_select_certified_coverage']:.1f}% | {100 * r['val_calib_certified_coverage']:.1f}% | "
              f"{100 * r['val_calib_accuracy']:.2f}% |")
    for metric, tolerance in variants(args.tolerances):
        group = [r for r in rows if r["selection_metric"] == label(metric, tolerance)]
        print(f"{label(metric, tolerance)}: mean val_calib certified coverage "
              f"{100 * statistics.fmean(r['val_calib_certified_coverage'] for r in group):.1f}%, accuracy "
              f"{100 * statistics.fmean(r['val_calib_accuracy'] for r in group):.2f}%")
    (args.workdir / f"selection_metric_{args.phase}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
