"""Directory swaps (fine-tuned backbone, ExPLoRA merge, bundle export): never an empty or partial name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stage1_core.dirswap import clean_leftovers, replace_dir, staging_dir

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def content(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_version(target: Path, tag: str) -> None:
    staged = staging_dir(target)
    for name in ("config.json", "model.safetensors"):
        (staged / name).write_text(f"{tag} {name}\n" * 100)
    replace_dir(staged, target)


class FakeModel:
    """What _save_merged needs of a Hugging Face model: save_pretrained writing two files."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def save_pretrained(self, directory, safe_serialization=True) -> None:
        for name in ("config.json", "model.safetensors"):
            (Path(directory) / name).write_text(f"{self.tag} {name}\n")


def test_finetuned_backbone_name_is_never_empty_when_the_swap_fails(tmp_path, monkeypatch):
    """The old swap removed the previous directory, then renamed: a failure (or kill) between left nothing."""
    from stage1_core.training.finetune import _save_merged

    out = tmp_path / "checkpoint" / "phase4" / "finetuned_backbone"
    _save_merged(FakeModel("old"), out)
    old = content(out)
    real_rename = os.rename

    def crash_on_final_rename(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError("simulated crash while renaming into the final name")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", crash_on_final_rename)
    with contextlib.suppress(OSError):  # the old swap raised here, after removing the previous directory
        _save_merged(FakeModel("new"), out)
    assert out.is_dir(), "the fine-tuned backbone's name is empty after a failed swap"
    assert content(out) in (old, {k: v.replace("old", "new") for k, v in old.items()})


SWAPPER = """
import sys
from pathlib import Path
from stage1_core.artifacts import atomic_write_bytes
from stage1_core.dirswap import replace_dir, staging_dir
target = Path(sys.argv[1])
staged = staging_dir(target)
for name in ("config.json", "model.safetensors"):
    atomic_write_bytes(staged / name, (f"new {name}\\n" * 100).encode())
replace_dir(staged, target)
"""

#: Where a kill lands: inside the staging writes, after the version is complete but before the link
#: flip, and after the flip but before the previous version is removed.
KILL_POINTS = {
    "mid-write of a staged file": ("*/model.safetensors", "mid-write", "old"),
    "version complete, not yet linked": ("*/target", "before-rename", "old"),
    "linked, previous not yet removed": ("*/target", "after-rename", "new"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_inside_the_swap_leaves_old_or_new_and_the_next_run_cleans_up(tmp_path, point):
    pattern, when, expected = KILL_POINTS[point]
    target = tmp_path / "target"
    write_version(target, "old")
    env = {**os.environ, "PYTHONPATH": str(REPO), "STAGE1_FAULT_INJECT": f"{pattern}:{when}"}
    run = subprocess.run([sys.executable, "-c", SWAPPER, str(target)], env=env, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stderr[-2000:])
    seen = content(target)
    assert set(seen) == {"config.json", "model.safetensors"}
    assert all(text == f"{expected} {name}\n" * 100 for name, text in seen.items()), point
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "target"]
    assert len(leftovers) >= 2, leftovers  # the current version and what the killed swap left
    removed = clean_leftovers(tmp_path)
    assert removed, f"nothing cleaned after a kill at {point}"
    assert content(target) == seen, "cleaning removed the live version"
    assert [p.name for p in tmp_path.iterdir() if p.name != "target"] == [os.readlink(target)]


def test_a_legacy_real_directory_is_replaced_and_then_swapped_by_link(tmp_path):
    target = tmp_path / "finetuned_backbone"
    target.mkdir()
    (target / "config.json").write_text("legacy\n")
    write_version(target, "new")
    assert target.is_symlink() and (target / "config.json").read_text().startswith("new")
    assert clean_leftovers(tmp_path) == []
