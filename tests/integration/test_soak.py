"""A short seeded soak (benchmarks/soak.py): concurrent runs SIGKILLed at random points, then a clean run.

Two ``checkpoint*`` runs of phase 1 start together (the second is kept apart by the partition lock
and the ``gpu`` pool) and are SIGKILLed at seeded moments; the audit must find no corrupt read,
and a clean run must then reproduce the fault-free bundle: same model and policy checksums,
thresholds and val_test decisions. The full soak (3 phases + 1 on the same partition, 10 rounds)
is ``python benchmarks/soak.py``.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.integration.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's string annotations through it
    spec.loader.exec_module(module)
    return module


def test_short_seeded_soak_loses_nothing(tmp_path, phase1_project):
    soak = _soak_module()
    lines: list[str] = []
    reports, expected, found = soak.soak(phase1_project, tmp_path / "soak", ["phase1"], rounds=1, seed=27,
                                         max_delay=45.0, log=lines.append)
    print("\n" + "\n".join(lines))
    assert [c for r in reports for c in r.corrupt] == []
    assert all(r.parsed > 0 for r in reports)
    assert len(reports[0].kills) == 2
    assert found == expected, (expected, found)
