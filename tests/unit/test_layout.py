from __future__ import annotations

from stage1_core.layout import Layout
from stage1_core.steps.context import Layout as StepsLayout


def test_an_asset_lives_under_the_root_by_name_and_partition(tmp_path):
    layout = Layout(tmp_path / "artifacts")
    assert layout.path("checkpoint", "phase2") == (tmp_path / "artifacts" / "checkpoint" / "phase2").resolve()
    assert layout.path("splits") == (tmp_path / "artifacts" / "splits").resolve()
    assert not layout.path("checkpoint", "phase2").exists()
    assert layout.dir("checkpoint", "phase2").is_dir()
    assert layout.feature_store == layout.root / "feature_store"
    assert layout.synthetic_dir == layout.root / "data" / "synthetic"


def test_the_steps_address_files_through_the_same_class():
    assert StepsLayout is Layout
