"""``make demo``: run every available phase in order, each as its own Dagster run, and summarise.

Each phase is its job, ``dagster job execute -m stage1_assets.definitions -j phaseN_train_gate_bundle
--tags '{"dagster/partition": "phaseN"}'``: every asset of the phase with that phase's gate checks,
a run the UI lists under the job's name. The full event log goes to
``$DAGSTER_HOME/logs/<phase>.log``; the terminal gets one line per step and per gate check with
its verdict. The demo stops at the first phase whose run fails (a gate, a step or data validation)
and ends with the per-phase table of ``stage1 summary --all``.

An optional phase (phase 5) whose *gate* fails does not stop the demo: the failure is printed with
its figures, the skip is recorded through the documented mechanism (the ``skip_phase5`` job, so
the UI shows it) with that failure as its reason, and the next phase builds on the phase before
it; the table then shows the phase as "failed, skipped". A phase a person skipped is not run. A
skip the demo recorded is removed before the phase is tried again. The exit code is 0 when every
phase that is not optional passed.

    python -m stage1_assets.demo [--phase phaseN]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


#: Prefix of the reason of a skip the demo itself recorded (removed before the phase is tried again).
DEMO_SKIP = "make demo: "


def layout_and_config() -> tuple[Any, Any]:
    """The artifacts layout and run config the demo's runs use (the same resolution as ``stage1 summary``)."""
    from stage1_core.cli import DEFAULT_ARTIFACTS_ROOT
    from stage1_core.config import Stage1ProConfig
    from stage1_core.steps.context import Layout

    config_path = Path(os.environ.get("STAGE1_CONFIG", "configs/default.yaml"))
    config = Stage1ProConfig.from_file(config_path) if config_path.is_file() else Stage1ProConfig()
    return Layout(os.environ.get("STAGE1_ARTIFACTS", DEFAULT_ARTIFACTS_ROOT)), config


def gate_failure_reason(partition: str) -> str | None:
    """"criterion: message; ..." when ``partition``'s gate failed (every step ran), else None."""
    from stage1_core.steps.summary import phase_status

    layout, config = layout_and_config()
    status = phase_status(config, layout, partition)
    if status["verdict"] != "GATE FAILED":
        return None
    return "; ".join(f"{v['criterion']}: {v['message']}" for v in status["failing"])


def record_demo_skip(partition: str, reason: str) -> int:
    """Record the skip through the ``skip_<phase>`` job (shown in the UI); its exit code."""
    run_config = {"ops": {f"record_skip_{partition}": {"config": {"reason": DEMO_SKIP + reason}}}}
    log_dir = Path(os.environ.get("DAGSTER_HOME", ".dagster_home")) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config_file = log_dir / f"skip_{partition}.run_config.json"
    config_file.write_text(json.dumps(run_config), encoding="utf-8")
    command = [str(BIN / "dagster"), "job", "execute", "-m", "stage1_assets.definitions", "-j", f"skip_{partition}",
               "--config", str(config_file)]
    result = subprocess.run(command, text=True, capture_output=True)
    if result.returncode != 0:
        print(f"  recording the skip of {partition} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return result.returncode


def prior_skip(partition: str) -> dict[str, Any] | None:
    """The skip record of an optional phase; one the demo recorded itself is removed (the phase is retried)."""
    from stage1_core.phase_state import read_skip, unskip_phase

    layout, _ = layout_and_config()
    record = read_skip(layout, partition)
    if record is not None and str(record.get("reason", "")).startswith(DEMO_SKIP):
        unskip_phase(layout, partition)
        return None
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default=None, help="run only this phase (e.g. phase3)")
    args = parser.parse_args(argv)
    home = Path(os.environ.get("DAGSTER_HOME", ".dagster_home"))
    log_dir = home / "logs"
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
        recipe = PHASES[phase_number(partition)]
        print(f"== {partition}: {recipe.title}", flush=True)
        skip = prior_skip(partition) if recipe.optional and not args.phase else None
        if skip is not None:
            print(f"  {partition}: skipped on purpose ({skip.get('reason')}); `stage1 phase unskip {partition}` "
                  f"to run it", flush=True)
            continue
        rc, wall, steps = run_phase(partition, log_dir)
        compute = sum(steps.values())
        print(f"  {partition}: run exit {rc}, wall {wall:.0f} s, step compute {compute:.0f} s, "
              f"full event log {log_dir / (partition + '.log')}", flush=True)
        summary = subprocess.run([str(BIN / "stage1"), "summary", "--phase", partition], text=True,
                                 capture_output=True)
        print(summary.stdout.rstrip(), flush=True)
        if rc != 0 or summary.returncode != 0:
            reason = gate_failure_reason(partition) if recipe.optional and not args.phase else None
            if reason is not None and record_demo_skip(partition, reason) == 0:
                print(f"{partition} failed its gate and is optional: skip recorded with that reason; the next phase "
                      f"builds on the phase before it", flush=True)
                continue
            status = 1
            print(f"stopped at {partition}: fix what is listed above, then `make demo PHASE={partition}`")
            break
    table = subprocess.run([str(BIN / "stage1"), "summary", "--all"], text=True, capture_output=True)
    print("\n" + table.stdout.rstrip())
    return status


if __name__ == "__main__":
    sys.exit(main())
