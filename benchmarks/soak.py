"""Soak: concurrent runs SIGKILLed at seeded random points, round after round, then a clean run.

On a project whose phases already passed (the reference, built here without faults unless
``--project`` names one), each round starts one ``dagster asset materialize --select checkpoint*``
per phase plus one more on the first phase's partition (which the partition locks and the ``gpu``
pool must keep apart), all at once, and SIGKILLs each process group at its own seeded random
moment. After every round an audit checks the artifacts root:

* every JSON, tensor, CSV and PNG under a final name parses (hidden temporary names are skipped);
* every asset partition's ``lineage.json`` either matches its files or is refused by the
  pipeline's own input check naming the changed file - never accepted while its files changed;
* every published bundle (``bundle/<phase>/bundle``) verifies.

After the rounds one clean run per phase (in phase order) must succeed, and its bundles must hold
the same model and policy files (sha256), thresholds and val_test decisions as the fault-free
reference (``bundle.json`` itself differs only in timestamps and run ids).

    python benchmarks/soak.py [--phases phase1 phase2 phase3] [--rounds 10] [--seed 0] [--workdir DIR]

Prints one line per round (kills, audit counts) and the final comparison; exits 1 on any
corrupt read or difference. ``tests/integration/test_soak.py`` runs a short seeded version.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.conftest import BIN, Project, clone_project, make_project, output  # noqa: E402


@dataclass
class RoundReport:
    """One round: when each run was killed and what the audit found."""

    kills: list[tuple[str, float, int | None]] = field(default_factory=list)
    parsed: int = 0
    verified: int = 0
    refused: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def _start(project: Project, partition: str) -> subprocess.Popen:
    args = [str(BIN / "dagster"), "asset", "materialize", "-m", "stage1_assets.definitions", "--select",
            "checkpoint*", "--partition", partition]
    env = dict(project.env)
    env.pop("STAGE1_FAULT_INJECT", None)
    # The project root is the working directory: dagster.yaml's instance paths are relative to it.
    return subprocess.Popen(args, cwd=project.home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_round(project: Project, partitions: list[str], rng: random.Random, max_delay: float) -> RoundReport:
    """Start one run per partition (plus one more on the first), SIGKILL each at a seeded moment."""
    report = RoundReport()
    targets = [*partitions, partitions[0]]
    delays = [rng.uniform(1.0, max_delay) for _ in targets]
    procs = [_start(project, partition) for partition in targets]
    start = time.monotonic()
    for (partition, proc, delay) in sorted(zip(targets, procs, delays), key=lambda t: t[2]):
        remaining = delay - (time.monotonic() - start)
        if remaining > 0:
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pass
        ended = proc.poll()
        if ended is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        report.kills.append((partition, round(delay, 1), ended))
    return report


def _parses(path: Path) -> str | None:
    from PIL import Image

    from stage1_core.artifacts import load_tensors

    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".pt", ".pth"):
            load_tensors(path)
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            if not rows or len({len(r) for r in rows}) != 1:
                return "empty or ragged CSV"
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
    except Exception as exc:  # noqa: BLE001 - any failure to parse is what is counted
        return f"{type(exc).__name__}: {exc}"
    return None


def audit(project: Project, partitions: list[str], report: RoundReport) -> RoundReport:
    """Fill ``report`` with the audit of the project's artifacts (see the module docstring)."""
    from stage1_core.bundle.load import verify_bundle
    from stage1_core.config import Stage1ProConfig
    from stage1_core.lineage import RECORD_FILE, StaleInputError, file_problems, read_record
    from stage1_core.steps.context import Layout, StepContext

    root = project.artifacts
    for directory, subdirs, files in os.walk(root):
        rel = Path(directory).relative_to(root)
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and not (rel == Path(".") and d in ("data", "backbones"))]
        for name in files:
            if name.startswith("."):
                continue
            path = Path(directory) / name
            report.parsed += 1
            if (problem := _parses(path)) is not None:
                report.corrupt.append(f"{path}: partial or unreadable under its final name ({problem})")
    config = Stage1ProConfig.from_file(project.config_path)
    layout = Layout(root)
    for record_file in sorted(root.rglob(RECORD_FILE)):
        parts = record_file.parent.relative_to(root).parts
        if any(part.startswith(".") for part in parts) or parts[0] in ("bundle",) and len(parts) > 2:
            continue
        asset, partition = parts[0], (parts[1] if len(parts) > 1 else None)
        record = read_record(record_file.parent, asset, partition)
        problems = file_problems(record)
        if not problems:
            report.verified += 1
            continue
        report.refused.append(record.name)
        with StepContext(config, layout, partition or partitions[0]) as ctx:
            try:
                ctx.require("soak-audit", [(asset, partition)])
            except StaleInputError:
                continue
        report.corrupt.append(f"{record.name}: files changed ({problems}) but the input check accepted it")
    for partition in partitions:
        link = root / "bundle" / partition / "bundle"
        if link.exists() or link.is_symlink():
            problems = verify_bundle(link)
            if problems:
                report.corrupt.append(f"published bundle {link} does not verify: {problems}")
            else:
                report.verified += 1
    return report


def bundle_summary(project: Project, partition: str) -> dict[str, object]:
    """What must not depend on faults: model and policy checksums, thresholds, val_test decisions."""
    link = project.artifacts / "bundle" / partition / "bundle"
    manifest = json.loads((link / "bundle.json").read_text())
    policy_file = manifest["policy_file"]
    policy = json.loads((link / policy_file).read_text())
    decisions = project.artifacts / "evaluation" / partition / "decisions.pt"
    return {
        "model_sha256": manifest["sha256"][manifest["model_file"]],
        "policy_sha256": manifest["sha256"][policy_file],
        "thresholds": {k: policy[k] for k in ("exit_threshold", "gate_threshold", "lambda1", "lambda2") if k in policy},
        "val_test_decisions_sha256": hashlib.sha256(decisions.read_bytes()).hexdigest(),
    }


def clean_runs(project: Project, partitions: list[str]) -> None:
    for partition in partitions:
        result = project.materialize("checkpoint*", partition)
        if result.returncode != 0:
            raise RuntimeError(f"clean run of {partition} after the soak failed:\n{output(result)}")


def soak(reference: Project, base: Path, partitions: list[str], rounds: int, seed: int, max_delay: float,
         log=print) -> tuple[list[RoundReport], dict[str, dict], dict[str, dict]]:
    """Run the soak on a clone of ``reference``; return the round reports and both bundle summaries."""
    expected = {p: bundle_summary(reference, p) for p in partitions}
    project = clone_project(reference, base)
    rng = random.Random(seed)
    reports = []
    for number in range(1, rounds + 1):
        report = audit(project, partitions, kill_round(project, partitions, rng, max_delay))
        reports.append(report)
        log(f"round {number}: kills {report.kills}; parsed {report.parsed}, verified {report.verified}, "
            f"refused {len(report.refused)}, corrupt {len(report.corrupt)}")
    clean_runs(project, partitions)
    final = audit(project, partitions, RoundReport())
    reports.append(final)
    found = {p: bundle_summary(project, p) for p in partitions}
    log(f"clean run: parsed {final.parsed}, verified {final.verified}, refused {len(final.refused)}, "
        f"corrupt {len(final.corrupt)}; bundles identical to the fault-free run: {found == expected}")
    return reports, expected, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", default=["phase1", "phase2", "phase3"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_delay", type=float, default=120.0, help="latest kill, seconds after the start")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--project", type=Path, default=None,
                        help="a project directory (dagster_home, artifacts, config.yaml) whose phases passed")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak_"))
    if args.project is not None:
        reference = Project.__new__(Project)
        reference.base, reference.home = args.project, args.project / "dagster_home"
        reference.artifacts, reference.config_path = args.project / "artifacts", args.project / "config.yaml"
    else:
        reference = make_project(work / "reference")
        for partition in args.phases:
            result = reference.materialize("*bundle", partition)
            if result.returncode != 0:
                print(f"reference run of {partition} failed:\n{output(result)}", file=sys.stderr)
                return 1
    started = time.monotonic()
    reports, expected, found = soak(reference, work / "soak", args.phases, args.rounds, args.seed, args.max_delay)
    corrupt = sum(len(r.corrupt) for r in reports)
    for report in reports:
        for line in report.corrupt:
            print(f"CORRUPT: {line}", file=sys.stderr)
    print(f"{args.rounds} rounds x {len(args.phases) + 1} runs killed, {corrupt} corrupt reads, bundles identical: "
          f"{found == expected}, {time.monotonic() - started:.0f} s")
    if found != expected:
        print(json.dumps({"expected": expected, "found": found}, indent=2), file=sys.stderr)
    return 0 if corrupt == 0 and found == expected else 1


if __name__ == "__main__":
    sys.exit(main())
