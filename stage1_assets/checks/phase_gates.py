"""One blocking, phase-partitioned asset check per gate criterion (``stage1_core.phases.CRITERIA``).

Each check only calls :func:`stage1_core.pipeline.evaluate_criterion` (a pure library function)
and turns its verdict into an ``AssetCheckResult``; a failed ERROR-severity result stops every
downstream asset of the run and shows red on the dashboard for that phase.

A criterion that is not part of a phase's gate emits no result for that phase (the check op may
emit a subset of its checks): the UI shows the evaluation as "Skipped" (grey), never as a green
pass, the run log says "NOT APPLICABLE", and nothing downstream waits for it.
"""

from collections.abc import Iterator

import dagster as dg

from stage1_assets.assets._common import to_metadata
from stage1_assets.partitions import phases
from stage1_assets.resources import Stage1Resource
from stage1_core import pipeline
from stage1_core.phases import CRITERIA, PHASES, Criterion


def criterion_phases(name: str) -> list[str]:
    """The phases whose gate includes criterion ``name``."""
    return [recipe.key for recipe in PHASES.values() if name in {c.name for c in recipe.criteria}]


def check_description(criterion: Criterion) -> str:
    """Plain-text description of a gate check: what it demands and in which phases it applies."""
    where = criterion_phases(criterion.name)
    scope = f"Part of the gate of {', '.join(where)}." if where else "Not part of any phase gate yet."
    return (
        f"{criterion.description[0].upper()}{criterion.description[1:]}. {scope} In other phases it is NOT "
        "APPLICABLE: not evaluated (shown as Skipped, never as passed) and blocks nothing. A failure stops the "
        "run: later assets of the phase, its bundle and the next phase wait until it passes."
    )


def not_applicable_message(criterion: Criterion, partition: str) -> str:
    """Why a criterion emits no verdict for ``partition`` (logged in the run, shown as Skipped in the UI)."""
    where = criterion_phases(criterion.name)
    return (f"{criterion.name} is NOT APPLICABLE to {partition}: not part of its gate (applies to "
            f"{', '.join(where) or 'no phase'}); not evaluated, nothing waits for it.")


def applies_to(criterion: Criterion, partition: str) -> bool:
    """Whether ``criterion`` is part of ``partition``'s gate."""
    return partition in criterion_phases(criterion.name)


def check_result(criterion: Criterion, stage1: Stage1Resource, partition: str) -> dg.AssetCheckResult:
    """The verdict of an applicable criterion; any exception is a failed ERROR-severity evaluation."""
    key = {"asset_key": dg.AssetKey(criterion.asset), "check_name": criterion.name}
    try:
        verdict = pipeline.evaluate_criterion(criterion.name, stage1.load_config(), stage1.layout(), partition)
    except Exception as exc:  # noqa: BLE001 - a check always yields a verdict
        return dg.AssetCheckResult(
            **key,
            passed=False,
            description=f"{criterion.name} could not be evaluated: {type(exc).__name__}: {exc}",
            severity=dg.AssetCheckSeverity.ERROR,
        )
    return dg.AssetCheckResult(
        **key,
        passed=bool(verdict.passed),
        description=verdict.message,
        metadata={"verdict": "passed" if verdict.passed else "failed", **to_metadata(verdict.figures)},
        severity=dg.AssetCheckSeverity.ERROR,
    )


def _make_check(criterion: Criterion) -> dg.AssetChecksDefinition:
    spec = dg.AssetCheckSpec(
        criterion.name,
        asset=criterion.asset,
        description=check_description(criterion),
        blocking=True,
        partitions_def=phases,
    )

    # can_subset: the op may emit no result, which is how a not-applicable phase is shown.
    @dg.multi_asset_check(specs=[spec], can_subset=True, name=spec.get_python_identifier())
    def _check(context: dg.AssetCheckExecutionContext, stage1: Stage1Resource) -> Iterator[dg.AssetCheckResult]:
        if not applies_to(criterion, context.partition_key):
            context.log.info(not_applicable_message(criterion, context.partition_key))
            return
        yield check_result(criterion, stage1, context.partition_key)

    return _check


phase_gate_checks = [_make_check(criterion) for criterion in CRITERIA.values()]

#: Check keys per phase: the per-phase jobs run only the criteria of that phase's gate.
CHECKS_BY_PHASE: dict[str, list[dg.AssetCheckKey]] = {
    recipe.key: [dg.AssetCheckKey(dg.AssetKey(c.asset), c.name) for c in recipe.criteria]
    for recipe in PHASES.values()
}
