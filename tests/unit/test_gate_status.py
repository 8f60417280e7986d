"""The one wrapper around Dagster's internal check-history API, and the guards built on it."""

import dagster as dg
import pytest

from stage1_assets.gate_status import latest_check_record, latest_materialization_id, phase_check_records
from stage1_assets.guards import require_gate_for_export, require_previous_phase_gates
from stage1_assets.partitions import phases
from stage1_core.phases import CRITERIA

VERDICTS: dict[str, bool] = {}


def _asset(name):
    @dg.asset(name=name, partitions_def=phases)
    def _a():
        return dg.MaterializeResult()

    return _a


ASSETS = {name: _asset(name) for name in ("checkpoint", "exit_policy", "evaluation", "bundle")}


def _check(criterion):
    @dg.asset_check(asset=criterion.asset, name=criterion.name, partitions_def=phases, blocking=False)
    def _c(context):
        return dg.AssetCheckResult(passed=VERDICTS.get(criterion.name, True), description=f"{criterion.name} verdict")

    return _c


CHECKS = [_check(c) for c in CRITERIA.values()]


@pytest.fixture
def instance(tmp_path):
    with dg.DagsterInstance.ephemeral(tempdir=str(tmp_path)) as inst:
        yield inst


def run(instance, partition, assets=None, checks=True):
    selected = [ASSETS[a] for a in (assets or ASSETS)]
    return dg.materialize(selected + (CHECKS if checks else []), partition_key=partition, instance=instance,
                          raise_on_error=False)


def test_records_follow_partition_and_staleness(instance):
    VERDICTS.clear()
    assert latest_check_record(instance, "evaluation", "val_test_fnr_bound", "phase1").passed is None
    run(instance, "phase1")
    record = latest_check_record(instance, "evaluation", "val_test_fnr_bound", "phase1")
    assert record.passed is True and record.judged_id == record.current_id
    assert latest_check_record(instance, "evaluation", "val_test_fnr_bound", "phase2").passed is None
    run(instance, "phase1", assets=["evaluation"], checks=False)
    stale = latest_check_record(instance, "evaluation", "val_test_fnr_bound", "phase1")
    assert stale.current_id != stale.judged_id
    assert latest_materialization_id(instance, "evaluation", "phase1") == stale.current_id


def test_export_guard_refuses_failed_never_run_and_stale_gates(instance):
    VERDICTS.clear()
    with pytest.raises(dg.Failure, match="never evaluated"):
        require_gate_for_export(instance, "phase1")
    VERDICTS["val_test_fnr_bound"] = False
    run(instance, "phase1")
    with pytest.raises(dg.Failure) as info:
        require_gate_for_export(instance, "phase1")
    assert "val_test_fnr_bound: failed (val_test_fnr_bound verdict)" in info.value.description
    VERDICTS.clear()
    run(instance, "phase1")
    require_gate_for_export(instance, "phase1")
    run(instance, "phase1", assets=["checkpoint"], checks=False)
    with pytest.raises(dg.Failure, match="rebuilt"):
        require_gate_for_export(instance, "phase1")


def test_training_guard_needs_previous_phase(instance):
    VERDICTS.clear()
    require_previous_phase_gates(instance, "phase1")
    with pytest.raises(dg.Failure, match="phase1.bundle_verified: never evaluated"):
        require_previous_phase_gates(instance, "phase2")
    run(instance, "phase1")
    require_previous_phase_gates(instance, "phase2")


def test_phase_check_records_excludes_bundle(instance):
    names, records = phase_check_records(instance, "phase1", exclude_assets=("bundle",))
    assert "bundle_verified" not in names and set(names) == set(records)


def test_planned_but_never_run_checks_count_as_never_evaluated(instance):
    """A blocking failure upstream leaves downstream checks PLANNED without a verdict."""

    @dg.asset(name="checkpoint", partitions_def=phases)
    def failing_checkpoint():
        raise RuntimeError("training crashed")

    checks = [c for c in CHECKS if c.check_keys and next(iter(c.check_keys)).asset_key == dg.AssetKey("checkpoint")]
    result = dg.materialize([failing_checkpoint, *checks], partition_key="phase1", instance=instance,
                            raise_on_error=False)
    assert not result.success
    record = latest_check_record(instance, "checkpoint", "training_completed", "phase1")
    assert record.passed is None
    with pytest.raises(dg.Failure, match="training_completed: never evaluated"):
        require_gate_for_export(instance, "phase1")
