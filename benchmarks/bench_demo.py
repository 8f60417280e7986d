"""Wall time of each phase's Dagster run against the sum of its step compute times.

Runs the demo's phases (``stage1_assets.demo.run_phase``) in a fresh DAGSTER_HOME and artifacts
root, then prints per phase: wall seconds, summed step compute seconds (as Dagster reports them),
and the overhead share (wall - compute) / wall. Target: overhead <= 15% of wall time. The
default data set is generated and features extracted once, in phase 1.

    python benchmarks/bench_demo.py [--phases phase1 phase2 phase3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", default=["phase1", "phase2", "phase3"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_demo_"))
    home = work / "project"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    os.environ.update(DAGSTER_HOME=str(home), STAGE1_ARTIFACTS=str(work / "artifacts"),
                      STAGE1_CONFIG=str(REPO / "configs" / "default.yaml"), DAGSTER_DISABLE_TELEMETRY="1",
                      PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    os.chdir(home)  # dagster.yaml's paths are relative to the project root
    from stage1_assets.demo import run_phase

    print(f"{'phase':<8}{'exit':>5}{'wall s':>9}{'compute s':>11}{'overhead':>10}")
    for partition in args.phases:
        (home / ".dagster_home").mkdir(exist_ok=True)
        rc, wall, steps = run_phase(partition, home / ".dagster_home")
        compute = sum(steps.values())
        print(f"{partition:<8}{rc:>5}{wall:>9.1f}{compute:>11.1f}{(wall - compute) / wall:>10.1%}", flush=True)
        if rc != 0:
            break
    print(f"logs under {home}")


if __name__ == "__main__":
    main()
