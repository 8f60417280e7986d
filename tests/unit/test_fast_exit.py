"""The run's process exits without collecting its heap: ``gc.freeze`` runs at exit, once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: Registered before anything else, so it runs after every later exit handler and sees their effect.
REPORT_AT_EXIT = "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"


def _frozen_at_exit(script: str, cwd: Path) -> int:
    done = subprocess.run([sys.executable, "-c", REPORT_AT_EXIT + textwrap.dedent(script)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("frozen ")]
    assert len(lines) == 1, done.stdout
    return int(lines[0].split()[1])


def test_registering_freezes_the_heap_at_exit_once(tmp_path):
    frozen = _frozen_at_exit("""
        from stage1_assets.fast_exit import freeze_heap_at_exit
        assert freeze_heap_at_exit() is True
        assert freeze_heap_at_exit() is False
        kept = [[i] for i in range(10_000)]
    """, tmp_path)
    assert frozen > 10_000


def test_without_registering_nothing_is_frozen(tmp_path):
    assert _frozen_at_exit("import stage1_assets.fast_exit\n", tmp_path) == 0


@pytest.mark.parametrize("mode", ["in_process", "multiprocess"])
def test_a_run_on_the_stage1_executor_registers_it(tmp_path, mode):
    (tmp_path / "tiny_job.py").write_text(textwrap.dedent("""
        import dagster as dg
        from stage1_assets.executor import stage1_executor

        @dg.op
        def one():
            return 1

        @dg.job(executor_def=stage1_executor)
        def tiny():
            one()
    """))
    frozen = _frozen_at_exit(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import dagster as dg
        from tiny_job import tiny
        with dg.instance_for_test() as instance:
            result = dg.execute_job(dg.reconstructable(tiny), instance=instance,
                                    run_config={{"execution": {{"config": {{"{mode}": {{}}}}}}}})
            assert result.success
    """, tmp_path)
    assert frozen > 0
