"""``make demo``: run every available phase in order, each as its own Dagster run, and summarise.

Each phase is its job, ``dagster job execute -m stage1_assets.definitions -j phaseN_train_gate_bundle
--tags '{"dagster/partition": "phaseN"}'``: every asset of the phase with that phase's gate checks,
a run the UI lists under the job's name. The full event log goes to
``$DAGSTER_HOME/.dagster_home/logs/<phase>.log`` (beside the instance's data); the terminal gets
one line per step and per gate check with its verdict. The demo stops at the first phase whose
run fails (a gate, a step or data validation) and ends with the per-phase table of
``stage1 summary --all``.

    python -m stage1_assets.demo [--phase phaseN]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from stage1_core.phases import PHASES, PhaseUnavailableError, get_recipe, phase_number

BIN = Path(sys.executable).parent
EVENT = re.compile(r" - (?P<step>[\w\[\]]+) - (?P<event>STEP_SUCCESS|STEP_FAILURE|ASSET_CHECK_EVALUATION|STEP_SKIPPED)"
                   r" - (?P<message>.*)$")
DURATION = re.compile(r'Finished execution of step "(?P<step>\w+)" in (?P<duration>(?:[\d.]+(?:ms|h|m|s))+)')
DURATION_PART = re.compile(r"(?P<value>[\d.]+)(?P<unit>ms|h|m|s)")


def parse_duration(text: str) -> float:
    """Seconds in a duration as Dagster formats it: ``828ms``, ``11.91s``, ``1m29s``, ``1h2m``."""
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(m["value"]) * scale[m["unit"]] for m in DURATION_PART.finditer(text))


def step_seconds(text: str) -> dict[str, float]:
    """Compute time of every step in a Dagster event log, as Dagster reports it."""
    return {m["step"]: parse_duration(m["duration"]) for m in DURATION.finditer(text)}


def phase_command(partition: str) -> list[str]:
    """The ``dagster job execute`` command that runs ``partition``'s job for that partition."""
    from stage1_assets.partitions import phase_job_name

    return [str(BIN / "dagster"), "job", "execute", "-m", "stage1_assets.definitions", "-j",
            phase_job_name(partition), "--tags", json.dumps({"dagster/partition": partition})]


def run_phase(partition: str, log_dir: Path) -> tuple[int, float, dict[str, float]]:
    """Run the phase job for one phase; print one line per step/check; return (rc, wall s, step s)."""
    log_path = log_dir / f"{partition}.log"
    command = phase_command(partition)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = EVENT.search(line.rstrip())
            if match:
                event = {"STEP_SUCCESS": "ok", "STEP_FAILURE": "FAILED", "STEP_SKIPPED": "skipped",
                         "ASSET_CHECK_EVALUATION": "check"}[match["event"]]
                print(f"  {partition} {match['step']:<48} {event:<7} {match['message'][:110]}", flush=True)
        rc = process.wait()
    wall = time.perf_counter() - started
    return rc, wall, step_seconds(log_path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default=None, help="run only this phase (e.g. phase3)")
    args = parser.parse_args(argv)
    from stage1_assets.instance import instance_data_dir

    log_dir = instance_data_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.phase:
        try:
            phases = [get_recipe(args.phase).key]
        except PhaseUnavailableError as exc:
            print(exc)
            return 1
    else:
        phases = [r.key for r in PHASES.values() if r.available]
    status = 0
    for partition in phases:
        print(f"== {partition}: {PHASES[phase_number(partition)].title}", flush=True)
        rc, wall, steps = run_phase(partition, log_dir)
        compute = sum(steps.values())
        print(f"  {partition}: run exit {rc}, wall {wall:.0f} s, step compute {compute:.0f} s, "
              f"full event log {log_dir / (partition + '.log')}", flush=True)
        summary = subprocess.run([str(BIN / "stage1"), "summary", "--phase", partition], text=True,
                                 capture_output=True)
        print(summary.stdout.rstrip(), flush=True)
        if rc != 0 or summary.returncode != 0:
            status = 1
            print(f"stopped at {partition}: fix what is listed above, then `make demo PHASE={partition}`")
            break
    table = subprocess.run([str(BIN / "stage1"), "summary", "--all"], text=True, capture_output=True)
    print("\n" + table.stdout.rstrip())
    return status


if __name__ == "__main__":
    sys.exit(main())
