"""publish(): readers never see a bundle change or vanish under them; the last N versions are kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stage1_core.bundle.load import bundle_id
from stage1_core.locking import version_hold
from stage1_core.steps.bundle import CURRENT_LINK, VERSIONS_DIR, publish

from tests.unit.test_bundle_export import export_test_bundle
from tests.unit.test_predictor import make_features, make_head, median_threshold

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[Path]:
    """Four finished bundles with different thresholds (so different ids), to publish in turn."""
    root = tmp_path_factory.mktemp("pool")
    head, features = make_head(), make_features()
    base = median_threshold(head, features)
    return [export_test_bundle(root, head, min(base + 0.01 * i, 0.999), out_name=f"b{i}") for i in range(4)]


def publish_copy(source: Path, parent: Path, keep: int = 3) -> str:
    """Stage a copy of ``source`` under ``parent/versions`` and publish it; return its id."""
    staged = parent / VERSIONS_DIR / f".staging-{os.getpid()}"
    shutil.copytree(source, staged)
    the_id = bundle_id(staged)
    publish(staged, parent, the_id, keep=keep)
    return the_id


def versions(parent: Path) -> set[str]:
    return {p.name for p in (parent / VERSIONS_DIR).iterdir() if not p.name.startswith(".")}


READER = textwrap.dedent("""
    import sys, time
    from stage1_core.bundle.load import Stage1Bundle
    link, seconds = sys.argv[1], float(sys.argv[2])
    Stage1Bundle.load(link).close()
    print("ready", flush=True)
    end, loads, seen = time.monotonic() + seconds, 0, set()
    while time.monotonic() < end:
        bundle = Stage1Bundle.load(link)   # any BundleError or OSError fails the test
        seen.add(bundle.bundle_id)
        bundle.close()
        loads += 1
    print(loads, len(seen))
""")


def test_reader_loading_in_a_loop_sees_only_whole_bundles_while_another_publishes(tmp_path, pool):
    parent = tmp_path / "bundle" / "phase1"
    (parent / VERSIONS_DIR).mkdir(parents=True)
    publish_copy(pool[0], parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    reader = subprocess.Popen([sys.executable, "-c", READER, str(parent / CURRENT_LINK), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    published = 0
    try:
        assert reader.stdout.readline().strip() == "ready"  # imports done, the first load worked
        while reader.poll() is None:
            publish_copy(pool[published % len(pool)], parent, keep=1)
            published += 1
    finally:
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, f"the reader saw a broken bundle after {published} publishes:\n{err[-3000:]}"
    loads, distinct = map(int, out.split())
    print(f"\n{loads} loads by the reader, {distinct} distinct bundles seen, {published} publishes meanwhile")
    assert published >= 10 and loads >= 10 and distinct >= 2, (published, loads, distinct)


def test_keeps_the_last_n_versions_and_never_one_a_reader_holds(tmp_path, pool):
    parent = tmp_path / "bundle" / "phase1"
    (parent / VERSIONS_DIR).mkdir(parents=True)
    ids = [publish_copy(pool[i], parent, keep=3) for i in range(3)]
    assert versions(parent) == set(ids)
    with version_hold(parent / VERSIONS_DIR / ids[0]):
        ids.append(publish_copy(pool[3], parent, keep=3))
        assert versions(parent) == set(ids), "a version a reader holds was removed"
    ids.append(publish_copy(pool[0], parent, keep=3))
    assert versions(parent) == set(ids[-3:]), "an old version no reader holds was kept beyond keep=3"
    assert os.readlink(parent / CURRENT_LINK) == f"{VERSIONS_DIR}/{ids[-1]}"
