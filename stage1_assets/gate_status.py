"""Read the latest gate-check verdicts from the Dagster instance, for the cross-run guards.

This is the one place that touches Dagster's internal event-log API
(``get_asset_check_execution_history`` with a ``PartitionKeyFilter``); an upgrade that changes it
breaks here, loudly, and ``tests/unit/test_gate_status.py`` says so.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from stage1_core.gates import CheckRecord
from stage1_core.phases import PHASES, phase_number


def latest_materialization_id(instance: dg.DagsterInstance, asset: str, partition: str) -> int | None:
    """Storage id of the latest materialisation of ``asset[partition]`` (None if never built)."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    )
    return result.records[0].storage_id if result.records else None


def latest_check_record(instance: dg.DagsterInstance, asset: str, check: str, partition: str) -> CheckRecord:
    """The latest evaluation of check ``check`` on ``asset[partition]`` as a :class:`CheckRecord`."""
    # Only completed evaluations count: a check planned in a run that stopped before it ran
    # (a blocking failure upstream) leaves a PLANNED record with no verdict.
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(asset), check),
        limit=1,
        status={AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED},
        partition_filter=PartitionKeyFilter(key=partition),
    )
    current = latest_materialization_id(instance, asset, partition)
    if not history or history[0].evaluation is None:
        return CheckRecord(check, None, current_id=current)
    evaluation = history[0].evaluation
    description = evaluation.description or ""
    target = evaluation.target_materialization_data
    return CheckRecord(
        check,
        bool(evaluation.passed),
        description,
        judged_id=target.storage_id if target else None,
        current_id=current,
    )


def phase_check_records(
    instance: dg.DagsterInstance, partition: str, exclude_assets: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, CheckRecord]]:
    """Expected criterion names of ``partition`` and their latest records."""
    recipe = PHASES[phase_number(partition)]
    names, records = [], {}
    for criterion in recipe.criteria:
        if criterion.asset in exclude_assets:
            continue
        names.append(criterion.name)
        records[criterion.name] = latest_check_record(instance, criterion.asset, criterion.name, partition)
    return names, records
