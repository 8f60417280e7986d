"""How far a certified policy's coverage moves between calibration draws, per phase, on tuning seeds.

A policy certified at maximum coverage (FNR on exits <= target_fnr_exit with probability
1 - delta) takes its threshold from a handful of confidently missed roadwork images, so a second
val_calib of the same size would certify another threshold. This benchmark measures that spread
for a fixed checkpoint: it resamples val_calib with replacement (``--draws`` times), certifies the
phase's exit score on each resample as the pipeline does (max softmax for phases 1-2, the raw gate
logit for gated heads: a monotone calibration keeps its order) and applies each certified threshold
to val_select, which played no part in it. It prints per seed and phase the coverage certified on
the full val_calib and the mean, standard deviation and 10-90% range of the resampled thresholds'
coverage of val_select.

The spread is a property of the split size and the exit score, not a verdict: it is why two
policies of equal quality can cover several points apart, and why a gate comparing two certified
policies (``no_regression_vs_previous_phase``) can stop a phase whose bundle is, as deployed, worse
than the previous one although its model is not. val_test is never read; run it on tuning seeds.

``--pairs phase4:phase3`` measures what that spread does to a phase gate's coverage comparison:
both phases are certified on the same resample of val_calib (the pipeline certifies both on the
same images), and the spread is that of the difference of their thresholds' coverage of
val_select. With ``s = sqrt(d / n)`` the paired standard error of a val_test difference (``d``
the share of val_select images on which the two certified policies' exits differ, ``n`` its size),
two models of equal quality pass the non-inferiority rule "CI lower end >= -margin" with
probability about ``Phi((margin - 1.96 s) / sqrt(sd^2 + s^2))``
(``acceptance.compare.noninferiority_power`` with ``spread_sd``): the power figure a verdict
prints counts ``s`` alone. The table gives that power at ``coverage_margin`` and the margin at
which it reaches 0.9.

    python benchmarks/certification_spread.py --workdir /tmp/tune1k --seeds 1001 1002 1003 \
        [--phases phase1 phase2 phase3] [--draws 200] [--pairs phase2:phase1 phase4:phase3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench_seeds import refuse_reported_seeds, use_seed


def _exit_score(outputs) -> np.ndarray:
    """The score the phase's policy thresholds: the raw gate logit of a gated head (a monotone
    calibration keeps its order), else max softmax."""
    return outputs.probs.max(axis=1) if outputs.gate_logits is None else outputs.gate_logits


def _sample_ids(layout, partition: str, split: str) -> list[str]:
    """The sample ids of a phase's stored predictions on ``split``, in row order."""
    from stage1_core.artifacts import read_json

    document = read_json(layout.path("predictions", partition) / "predictions.json", schema="predictions")
    return next(row["sample_ids"] for row in document["splits"] if row["split"] == split)


def spread(seed_dir: Path, partition: str, draws: int, rng: np.random.Generator) -> dict[str, float] | None:
    """Certified coverage on val_calib and the val_select coverage of resampled certificates."""
    from stage1_assets.demo import layout_and_config
    from stage1_core.calibration.threshold_sweep import certify_score_threshold
    from stage1_core.phases import config_for_phase
    from stage1_core.steps.training import load_split_outputs

    use_seed(seed_dir)
    layout, config = layout_and_config()
    if not (layout.path("predictions", partition) / "predictions.json").is_file():
        return None
    cfg = config_for_phase(config, partition)
    calib = load_split_outputs(layout, partition, "val_calib")
    select = load_split_outputs(layout, partition, "val_select")

    scores, predictions, labels = _exit_score(calib), calib.probs.argmax(axis=1), calib.labels
    held_out = _exit_score(select)
    full = certify_score_threshold(scores, predictions, labels, cfg.target_fnr_exit, cfg.delta)
    coverages = []
    for _ in range(draws):
        rows = rng.integers(0, len(labels), len(labels))
        result = certify_score_threshold(scores[rows], predictions[rows], labels[rows], cfg.target_fnr_exit, cfg.delta)
        coverages.append(0.0 if result.exit_threshold is None else float((held_out >= result.exit_threshold).mean()))
    values = np.asarray(coverages)
    low, high = np.quantile(values, [0.1, 0.9])
    return {"score": "gate logit" if calib.gate_logits is not None else "max softmax", "certified": float(full.coverage),
            "mean": float(values.mean()), "sd": float(values.std(ddof=1)), "q10": float(low), "q90": float(high)}


def paired_spread(seed_dir: Path, current: str, previous: str, draws: int, rng: np.random.Generator,
                  margin: float) -> dict[str, float] | None:
    """Spread of the coverage difference of two phases certified on the same val_calib resamples,
    and the power of ``margin`` for models of equal quality once that spread is counted."""
    from scipy.stats import norm

    from stage1_assets.demo import layout_and_config
    from stage1_core.acceptance.compare import noninferiority_power
    from stage1_core.calibration.threshold_sweep import certify_score_threshold
    from stage1_core.phases import config_for_phase
    from stage1_core.steps.training import load_split_outputs

    use_seed(seed_dir)
    layout, config = layout_and_config()
    if not all((layout.path("predictions", p) / "predictions.json").is_file() for p in (current, previous)):
        return None
    cfg = config_for_phase(config, current)
    calib = {p: load_split_outputs(layout, p, "val_calib") for p in (current, previous)}
    select = {p: load_split_outputs(layout, p, "val_select") for p in (current, previous)}
    for split in ("val_calib", "val_select"):  # the same images in the same order, else the pairing means nothing
        if len({tuple(_sample_ids(layout, p, split)) for p in (current, previous)}) != 1:
            raise SystemExit(f"{seed_dir}: {current} and {previous} predictions hold different {split} rows")

    # Per phase, once: its exit score, prediction and label on val_calib, and its exit score on val_select.
    arrays = {p: (_exit_score(calib[p]), calib[p].probs.argmax(axis=1), calib[p].labels, _exit_score(select[p]))
              for p in (current, previous)}

    def exits(partition: str, rows: np.ndarray | slice) -> np.ndarray:
        scores, predictions, labels, held_out = arrays[partition]
        result = certify_score_threshold(scores[rows], predictions[rows], labels[rows], cfg.target_fnr_exit, cfg.delta)
        return np.zeros_like(held_out, dtype=bool) if result.exit_threshold is None else held_out >= result.exit_threshold

    full = {p: exits(p, slice(None)) for p in (current, previous)}
    n = full[current].size
    differences = []
    for _ in range(draws):
        rows = rng.integers(0, calib[current].labels.size, calib[current].labels.size)
        differences.append(float(exits(current, rows).mean() - exits(previous, rows).mean()))
    sd = float(np.std(differences, ddof=1))
    disagreement = float(np.mean(full[current] != full[previous]))
    s = float(np.sqrt(disagreement / n))
    return {"difference": float(full[current].mean() - full[previous].mean()), "sd": sd, "s": s,
            "power": noninferiority_power(margin, n, disagreement, spread_sd=sd),
            "power_sampling_only": noninferiority_power(margin, n, disagreement),
            "margin_90": float(norm.ppf(0.975)) * s + float(norm.ppf(0.9)) * float(np.hypot(sd, s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a bench_seeds.py workdir")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1001, 1002, 1003])
    parser.add_argument("--phases", nargs="+", default=["phase1", "phase2", "phase3", "phase4"])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--pairs", nargs="*", default=[], metavar="CURRENT:PREVIOUS",
                        help="phase comparisons to measure, e.g. phase4:phase3 (the coverage clause of the gates)")
    args = parser.parse_args()
    refuse_reported_seeds(args.seeds)
    rng = np.random.default_rng(0)
    if args.pairs:
        from stage1_core.config import Stage1ProConfig

        margin = Stage1ProConfig().coverage_margin
        print(f"| seed | comparison | coverage difference of val_select | sd over val_calib resamples | s (val_test "
              f"sampling) | power at {100 * margin:g} points: sampling only, with the spread | margin for 0.9 |")
        print("|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            for pair in args.pairs:
                current, _, previous = pair.partition(":")
                row = paired_spread(args.workdir / f"seed_{seed}", current, previous, args.draws, rng, margin)
                if row is None:
                    continue
                print(f"| {seed} | {current} vs {previous} | {100 * row['difference']:+.1f} | {100 * row['sd']:.1f} | "
                      f"{100 * row['s']:.2f} | {row['power_sampling_only']:.2f}, {row['power']:.2f} | "
                      f"{100 * row['margin_90']:.1f} |")
        return
    print("| seed | phase | exit score | certified on val_calib | resampled: mean coverage of val_select | sd | 10-90% |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for partition in args.phases:
            row = spread(args.workdir / f"seed_{seed}", partition, args.draws, rng)
            if row is None:
                continue
            print(f"| {seed} | {partition} | {row['score']} | {100 * row['certified']:.1f}% | {100 * row['mean']:.1f}% | "
                  f"{100 * row['sd']:.1f} | {100 * row['q10']:.1f}-{100 * row['q90']:.1f}% |")


if __name__ == "__main__":
    main()
