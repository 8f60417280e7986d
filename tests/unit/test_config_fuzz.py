"""Fuzzing the configuration: ``Stage1ProConfig.from_dict`` and ``from_file`` (YAML and JSON).

A config built from known field names with hostile values (wrong types, NaN, infinities, huge
numbers, strings, nesting) is either valid or refused with a :class:`ConfigError` (an
``ArtifactError`` for a JSON file that breaks config.schema.json) - never another exception -
and the refusal names every field that is invalid on its own.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1_core.artifacts import ArtifactError
from stage1_core.config import ConfigError, Stage1ProConfig

pytestmark = pytest.mark.timeout(300)

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
FIELDS = sorted(Stage1ProConfig.model_fields)
#: Fields whose validity depends on another field; a lone bad value may be fixed by a neighbour.
CROSS_FIELD = {
    "epochs", "warmup_epochs", "max_batch_size", "fallback_batch_size", "val_select_ratio", "val_calib_ratio",
    "val_test_ratio", "phase", "exit_policy",
}

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 3, 10**30, -(10**30), 10**400, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 0.5, 1.0, 1e-300, 1e300]),
    st.sampled_from(["", "abc", "1", "0.5", "nan", "inf", "true", "builtin:tiny-dinov3", "builtin:nope", "train", "synthetic"]),
    st.text(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
configs = st.dictionaries(st.sampled_from(FIELDS), hostile, max_size=6)


def alone_invalid(field: str, value: Any) -> bool:
    try:
        Stage1ProConfig.from_dict({field: value})
    except ConfigError:
        return True
    return False


def named(field: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(field)}\b", text) is not None


def check_refusal(data: dict[str, Any], message: str) -> None:
    for field, value in data.items():
        if field not in CROSS_FIELD and alone_invalid(field, value):
            assert named(field, message), f"{field}={value!r} is invalid but not reported:\n{message}"


def test_from_dict_reports_every_bad_field():
    counts = {"valid": 0, "refused": 0}

    @settings(max_examples=600, **FUZZ)
    @given(configs)
    def fuzz(data: dict[str, Any]) -> None:
        try:
            config = Stage1ProConfig.from_dict(data)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            check_refusal(data, str(exc))
            counts["refused"] += 1
            return
        assert all(not alone_invalid(f, v) for f, v in data.items() if f not in CROSS_FIELD)
        assert isinstance(config, Stage1ProConfig)
        counts["valid"] += 1

    fuzz()
    print(f"\nconfig fuzz from_dict: {counts}")
    assert counts["valid"] > 0 and counts["refused"] > 0


def test_from_file_yaml_never_crashes(tmp_path: Path):
    counts = {"valid": 0, "refused": 0}
    path = tmp_path / "config.yaml"

    @settings(max_examples=300, **FUZZ)
    @given(configs, st.sampled_from(["plain", "huge_int", "deep", "bad_yaml", "not_mapping", "aliases"]))
    def fuzz(data: dict[str, Any], twist: str) -> None:
        text = yaml.safe_dump(data, allow_unicode=True)
        if twist == "huge_int":
            text += "epochs: 1" + "0" * 5000 + "\n"
        elif twist == "deep":
            text = "model_path: " + "[" * 5000 + "]" * 5000 + "\n"
        elif twist == "bad_yaml":
            text += "epochs: [unclosed\n"
        elif twist == "not_mapping":
            text = "- just\n- a list\n"
        elif twist == "aliases":  # "billion laughs": shared references must not blow up time or memory
            lines = ['lol0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
            lines += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
            text = "\n".join(lines) + "\nmodel_path: *l8\n"
        path.write_text(text, encoding="utf-8")
        try:
            Stage1ProConfig.from_file(path)
        except ConfigError as exc:
            assert exc.problems and len(str(exc)) < 20_000, len(str(exc))
            if twist == "plain":
                check_refusal(data, str(exc))
            counts["refused"] += 1
            return
        assert twist == "plain", twist
        counts["valid"] += 1

    fuzz()
    print(f"\nconfig fuzz from_file (YAML): {counts}")
    assert counts["valid"] > 0 and counts["refused"] > 0


def test_from_file_json_never_crashes(tmp_path: Path):
    counts = {"valid": 0, "refused": 0}
    path = tmp_path / "config.json"
    base = json.loads(Stage1ProConfig().model_dump_json())

    @settings(max_examples=300, **FUZZ)
    @given(configs, st.sampled_from(["plain", "huge_int", "deep"]))
    def fuzz(changes: dict[str, Any], twist: str) -> None:
        text = json.dumps({**base, **changes}, allow_nan=True)
        if twist == "huge_int":
            text = text.replace('"epochs": 10', '"epochs": 1' + "0" * 5000)
        elif twist == "deep":
            text = text.replace('"seed": 42', '"seed": ' + "[" * 100_000 + "]" * 100_000)
        path.write_text(text, encoding="utf-8")
        try:
            Stage1ProConfig.from_file(path)
        except (ConfigError, ArtifactError) as exc:
            assert str(exc)
            if twist == "plain":
                for field, value in changes.items():
                    if field not in CROSS_FIELD and alone_invalid(field, value):
                        assert named(field, str(exc)) or f"$.{field}" in str(exc), (field, value, str(exc))
            counts["refused"] += 1
            return
        assert twist == "plain"
        counts["valid"] += 1

    fuzz()
    print(f"\nconfig fuzz from_file (JSON): {counts}")
    assert counts["valid"] > 0 and counts["refused"] > 0
