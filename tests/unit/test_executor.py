"""The code location's executor: in-process by default, multiprocess (forkserver preloading) on request."""

from __future__ import annotations


from stage1_assets.definitions import defs
from stage1_assets.executor import PRELOAD_MODULES, multiprocess_config, stage1_executor


def test_phase_jobs_use_the_stage1_executor_with_in_process_default():
    repository = defs.get_repository_def()
    job = repository.get_job("phase1_train_gate_bundle")
    assert job.executor_def.name == "stage1_executor"
    assert stage1_executor.config_schema.default_value == {"in_process": {}}


def test_multiprocess_defaults_to_a_forkserver_preloading_the_code_location_and_keeps_a_given_start():
    assert multiprocess_config({"max_concurrent": 2}) == {
        "max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": PRELOAD_MODULES}}}
    given = {"start_method": {"spawn": {}}}
    assert multiprocess_config(given) == given

