"""Cross-run guards: blocking checks only act inside one run, these act across runs."""

from __future__ import annotations

import dagster as dg

from stage1_assets.gate_status import latest_materialization_id, phase_check_records
from stage1_core.gates import gate_failures
from stage1_core.phase_state import prerequisite_failures, read_skip
from stage1_core.steps.context import Layout
from stage1_core.phases import PHASES, phase_number, previous_phases


def _raise_if_failing(title: str, failures: list[str]) -> None:
    if failures:
        raise dg.Failure(
            description=title + ":\n  " + "\n  ".join(failures),
            metadata={"failing_criteria": dg.MetadataValue.json(failures)},
        )


def require_gate_for_export(instance: dg.DagsterInstance, partition: str) -> None:
    """``bundle[phaseN]`` exports only when phaseN's latest gate-check evaluations all passed.

    Each must also have judged the current materialisation of its asset, so ``--select bundle``
    alone cannot skip a failed or never-run gate.
    """
    names, records = phase_check_records(instance, partition, exclude_assets=("bundle",))
    _raise_if_failing(f"bundle[{partition}] refused: the {partition} gate has not passed", gate_failures(names, records))


def require_previous_phase_gates(instance: dg.DagsterInstance, partition: str, layout: Layout | None = None) -> None:
    """phaseN's training assets refuse to start unless the gates of the phases it builds on passed.

    An optional phase (5) counts when it was attempted (it has a checkpoint materialisation) and
    is not skipped (``stage1 phase skip``); the refusal then names both ways out.
    """
    skipped = {
        number for number, recipe in PHASES.items()
        if recipe.optional and layout is not None and read_skip(layout, recipe.key) is not None
    }
    attempted = {
        number
        for number, recipe in PHASES.items()
        if recipe.optional and number not in skipped
        and latest_materialization_id(instance, "checkpoint", recipe.key) is not None
    }
    needed = previous_phases(phase_number(partition), attempted)
    failures = prerequisite_failures(
        partition, attempted, {PHASES[n].key: gate_failures(*phase_check_records(instance, PHASES[n].key)) for n in needed}
    )
    _raise_if_failing(f"{partition} refused: an earlier phase's gate has not passed", failures)
