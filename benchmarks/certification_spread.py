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

    python benchmarks/certification_spread.py --workdir /tmp/tune1k --seeds 1001 1002 1003 \
        [--phases phase1 phase2 phase3] [--draws 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench_seeds import refuse_reported_seeds, use_seed



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

    def score(outputs):
        return outputs.probs.max(axis=1) if outputs.gate_logits is None else outputs.gate_logits

    scores, predictions, labels = score(calib), calib.probs.argmax(axis=1), calib.labels
    held_out = score(select)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a bench_seeds.py workdir")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1001, 1002, 1003])
    parser.add_argument("--phases", nargs="+", default=["phase1", "phase2", "phase3", "phase4"])
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    refuse_reported_seeds(args.seeds)
    rng = np.random.default_rng(0)
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
