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
