"""Atomic, schema-validated artifact IO."""

import json
import os

import pytest
import torch

from stage1_core import artifacts
from stage1_core.artifacts import ArtifactError


def test_write_json_is_atomic_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "doc.json"
    artifacts.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in target.parent.iterdir()] == ["doc.json"]


def test_failed_write_keeps_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "doc.json"
    artifacts.write_json(target, {"version": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        artifacts.write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_schema_violation_names_file_and_json_path(tmp_path):
    bad = {"schema_version": 1, "phase": 9}
    with pytest.raises(ArtifactError) as info:
        artifacts.write_json(tmp_path / "bundle.json", bad, schema="bundle")
    message = str(info.value)
    assert "bundle.json" in message and "$.phase" in message
    assert not (tmp_path / "bundle.json").exists()


def test_read_json_reports_line_of_syntax_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ArtifactError, match=r"broken.json:3:"):
        artifacts.read_json(path)


def test_read_json_validates_on_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dropout": 0.3}))
    with pytest.raises(ArtifactError, match="config.schema.json"):
        artifacts.read_json(path, schema="config")


def test_tensor_round_trip_and_pickle_refusal(tmp_path):
    path = artifacts.save_tensors(tmp_path / "t.pt", {"w": torch.arange(4.0)})
    assert torch.equal(artifacts.load_tensors(path)["w"], torch.arange(4.0))

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="refused to load"):
        artifacts.load_tensors(tmp_path / "evil.pt")


def test_truncated_tensor_file_is_reported(tmp_path):
    path = artifacts.save_tensors(tmp_path / "t.pt", {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="t.pt"):
        artifacts.load_tensors(path)


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert artifacts.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("name", ["config", "splits", "thresholds", "gateparams", "scrcparams", "bundle"])
def test_every_schema_is_a_valid_strict_schema(name):
    import jsonschema

    schema = artifacts.load_schema(name)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema.get("additionalProperties") is False
    assert schema.get("required")


def test_written_files_get_normal_permissions(tmp_path):
    path = artifacts.write_json(tmp_path / "doc.json", {"x": 1})
    mode = path.stat().st_mode & 0o777
    assert mode & 0o044, oct(mode)  # readable by group/others like any file the user writes


# ----- fault injection (STAGE1_FAULT_INJECT) ------------------------------------------------

_WRITER = """
import sys
from stage1_core import artifacts
artifacts.atomic_write_bytes(sys.argv[1], b"new" * 1000)
artifacts.atomic_write_bytes(sys.argv[1], b"newer" * 1000)
print("done")
"""


def _write_with_fault(target, spec):
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), artifacts.FAULT_ENV: spec}
    return subprocess.run([sys.executable, "-c", _WRITER, str(target)], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("when", artifacts.FAULT_POINTS)
def test_fault_injection_kills_the_writer_at_each_point(tmp_path, when):
    import signal

    target = tmp_path / "model.pth"
    target.write_bytes(b"old")
    result = _write_with_fault(target, f"*/model.pth:{when}")
    assert result.returncode == -signal.SIGKILL, result
    assert "done" not in result.stdout
    temps = [p for p in tmp_path.iterdir() if p.name != "model.pth"]
    if when == "after-rename":
        assert target.read_bytes() == b"new" * 1000 and temps == []
    else:
        assert target.read_bytes() == b"old", "a killed write must leave the previous file as it was"
    if when == "mid-write":
        assert len(temps) == 1 and temps[0].read_bytes() == (b"new" * 1000)[:1500]
        assert temps[0].name.startswith(".model.pth.") and temps[0].name.endswith(".tmp")
    if when == "before-rename":
        assert len(temps) == 1 and temps[0].read_bytes() == b"new" * 1000


def test_fault_injection_counts_matching_writes_and_ignores_others(tmp_path):
    import signal

    target = tmp_path / "doc.json"
    second = _write_with_fault(target, "*/doc.json:before-write:2")
    assert second.returncode == -signal.SIGKILL and target.read_bytes() == b"new" * 1000
    other = _write_with_fault(tmp_path / "other.bin", "*/doc.json:mid-write")
    assert other.returncode == 0 and "done" in other.stdout
    assert (tmp_path / "other.bin").read_bytes() == b"newer" * 1000


@pytest.mark.parametrize("spec", ["*/x.json", "*/x.json:sometime", "*/x.json:mid-write:0", ":mid-write"])
def test_malformed_fault_spec_is_refused(tmp_path, monkeypatch, spec):
    monkeypatch.setenv(artifacts.FAULT_ENV, spec)
    with pytest.raises(ValueError, match=artifacts.FAULT_ENV):
        artifacts.write_json(tmp_path / "x.json", {"a": 1})


def test_unset_fault_injection_writes_normally(tmp_path, monkeypatch):
    monkeypatch.delenv(artifacts.FAULT_ENV, raising=False)
    artifacts.fault_point(tmp_path / "x", "mid-write")
    artifacts.write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_jsonable_has_one_rule_for_numpy_and_non_finite_values():
    import math

    import numpy as np

    from stage1_core.artifacts import jsonable

    value = {"a": np.float32(0.5), 1: (np.int64(3), float("nan")), "b": [math.inf, np.bool_(True)], "c": None}
    assert jsonable(value) == {"a": 0.5, "1": [3, None], "b": [None, True], "c": None}
    assert type(jsonable(np.float64(2.0))) is float and jsonable(-math.inf) is None


def test_publish_directory_swaps_in_the_new_content_or_refuses_without_replace(tmp_path):
    from stage1_core.dirswap import publish_directory

    target = tmp_path / "out"
    for content in ("first", "second"):
        staged = tmp_path / f".staged-{content}"
        staged.mkdir()
        (staged / "file.txt").write_text(content)
        assert publish_directory(staged, target) == target and not staged.exists()
        assert (target / "file.txt").read_text() == content
    # A replace is a link flip: "out" plus the one version directory it points at; the old one is gone.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[1] == "out" and target.is_symlink(), names
    assert target.resolve().name == names[0]
    keep = tmp_path / ".staged-third"
    keep.mkdir()
    with pytest.raises(FileExistsError, match="not replacing"):
        publish_directory(keep, target, replace=False)
    assert keep.is_dir() and (target / "file.txt").read_text() == "second"
