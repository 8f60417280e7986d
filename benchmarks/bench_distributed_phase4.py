"""Phase 4 of the embedded default with ``world_size: 2`` beside ``world_size: 1``: gate verdicts and figures.

Phases 1-3 run once (``world_size: 1``) in ``<workdir>/base`` - the phase jobs of ``make demo``,
each a ``dagster job execute`` in a fresh ``DAGSTER_HOME`` - then the base (instance and
artifacts) is copied twice and phase 4's job runs in each copy, with the config's
``world_size`` set to 1 and to 2. With 2, its ``backbone`` (ExPLoRA), ``cached_features`` and
``checkpoint`` (PEFT fine-tuning) steps each run as a ``torchrun`` job of 2 ranks through
Dagster Pipes, the run's torch threads split between the ranks. Printed per world size: the
phase-4 job's wall time and step times, every gate criterion's verdict with its description,
and the headline figures of the checkpoint and the evaluation. Reuse ``--workdir`` to skip
phases 1-3 when they already passed there.

    python benchmarks/bench_distributed_phase4.py --workdir /tmp/bench_phase4 [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DAGSTER_HOME=str(project / "home"), STAGE1_CONFIG=str(project / "config.yaml"),
               STAGE1_ARTIFACTS=str(project / "artifacts"), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def new_project(project: Path, config: dict) -> None:
    (project / "home").mkdir(parents=True, exist_ok=True)
    # The root dagster.yaml: its instance paths are relative, so each project's runs use its home as
    # working directory (as `make demo` uses the project root).
    shutil.copy(REPO / "dagster.yaml", project / "home" / "dagster.yaml")
    (project / "config.yaml").write_text(yaml.safe_dump(config))


def run_phase(project: Path, partition: str) -> tuple[int, float, dict[str, float]]:
    """Run ``partition``'s job in ``project``; ``(exit code, wall seconds, step seconds)``; log in the project."""
    from stage1_assets.demo import phase_command, step_seconds

    started = time.perf_counter()
    done = subprocess.run(phase_command(partition), cwd=project / "home", env=project_env(project), capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    log = done.stdout + done.stderr
    (project / f"{partition}.log").write_text(log)
    return done.returncode, wall, step_seconds(log)


def verdicts(project: Path, partition: str) -> list[tuple[str, bool | None, str]]:
    from stage1_assets.gate_status import phase_check_records
    from stage1_assets.instance import open_instance

    with open_instance(project / "home") as instance:
        names, records = phase_check_records(instance, partition)
        return [(name, records[name].passed, records[name].message) for name in names]


def figures(project: Path) -> dict[str, object]:
    root = project / "artifacts"
    training = json.loads((root / "checkpoint" / "phase4" / "training.json").read_text())
    backbone = json.loads((root / "backbone" / "phase4" / "backbone.json").read_text())
    out: dict[str, object] = {
        "explora_held_out_relative_reduction": backbone.get("explora", {}).get("gain", {}).get("relative_reduction"),
        "checkpoint_best_val_accuracy": training["best_val_accuracy"],
        "checkpoint_best_metric (augrc)": training["best_metric"],
        "finetune_batch_size": training.get("batch_size"),
        "environment": training["environment"],
    }
    metrics = root / "evaluation" / "phase4" / "metrics.csv"
    if metrics.is_file():
        out["evaluation metrics.csv (first rows)"] = metrics.read_text().splitlines()[:4]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    base = args.workdir / "base"
    if not (base / "phase3.done").is_file():
        shutil.rmtree(base, ignore_errors=True)
        new_project(base, {**config, "world_size": 1})
        for partition in ("phase1", "phase2", "phase3"):
            rc, wall, _ = run_phase(base, partition)
            print(f"base {partition}: exit {rc} in {wall / 60:.1f} min", flush=True)
            if rc != 0:
                print(f"{partition} failed; see {base / (partition + '.log')}")
                return 1
        (base / "phase3.done").write_text("ok\n")
    results = {}
    for world in args.world_sizes:
        project = args.workdir / f"world{world}"
        shutil.rmtree(project, ignore_errors=True)
        shutil.copytree(base, project, symlinks=True)
        (project / "config.yaml").write_text(yaml.safe_dump({**config, "world_size": world}))
        rc, wall, steps = run_phase(project, "phase4")
        results[world] = (rc, wall, steps)
        print(f"\n=== phase 4, world_size {world}: exit {rc}, {wall / 60:.1f} min wall", flush=True)
        print("steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()))
        for name, passed, description in verdicts(project, "phase4"):
            verdict = {True: "PASS", False: "FAIL", None: "not run"}[passed]
            print(f"  {verdict:7s} {name}: {description.splitlines()[0] if description else ''}")
        if rc == 0 or (project / "artifacts" / "checkpoint" / "phase4" / "training.json").is_file():
            for key, value in figures(project).items():
                print(f"  {key}: {value}")
    if 1 in results and 2 in results:
        w1, w2 = results[1][1], results[2][1]
        print(f"\nphase-4 wall time ratio world_size 2 / 1: {w2 / w1:.2f} ({w2 / 60:.1f} vs {w1 / 60:.1f} min)")
    return 0 if all(r[0] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
