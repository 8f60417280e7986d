"""Hash-based splits: determinism, stability, stratification, splits.json and split roles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from stage1_core.artifacts import ArtifactError, load_schema
from stage1_core.data.datasets import Sample
from stage1_core.data.splits import (
    SPLIT_NAMES,
    SPLIT_ROLES,
    USAGE_RULES,
    VAL_SPLITS,
    SplitError,
    Splits,
    assign_val_split,
    hash_position,
    load_splits,
    make_splits,
    require_role,
    require_split,
    save_splits,
    split_of_ids,
)


def _samples(n: int, positive_rate: float, prefix: str, seed: int = 0, source: str = "natix") -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(f"{prefix}_{i:06d}.jpg", Path(f"/data/{prefix}_{i:06d}.jpg"), int(rng.random() < positive_rate), source, i + 2)
        for i in range(n)
    ]


@pytest.fixture()
def split_inputs() -> tuple[list[Sample], list[Sample]]:
    return _samples(300, 0.8, "train", seed=1), _samples(600, 0.9, "val", seed=2)


def _assignment(splits: Splits) -> dict[str, str]:
    return {sid: name for name in VAL_SPLITS for sid in splits[name]}


def test_hash_position_is_sha256_based_and_in_unit_interval() -> None:
    digest = hashlib.sha256(b"a.jpg\x0042").digest()
    assert hash_position("a.jpg", 42) == int.from_bytes(digest[:8], "big") / 2**64
    values = [hash_position(f"img{i}", 7) for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(np.mean(values) - 0.5) < 0.02


def test_assign_val_split_follows_cumulative_ratios() -> None:
    ratios = (0.33, 0.33, 0.34)
    for i in range(200):
        u = hash_position(f"x{i}", 3)
        expected = "val_select" if u < 0.33 else "val_calib" if u < 0.66 else "val_test"
        assert assign_val_split(f"x{i}", 3, ratios) == expected


def test_train_is_all_training_samples_and_val_is_partitioned(split_inputs) -> None:
    train, val = split_inputs
    splits = make_splits(train, val, seed=42)
    assert splits.train == tuple(s.sample_id for s in train)
    val_ids = [sid for name in VAL_SPLITS for sid in splits[name]]
    assert sorted(val_ids) == sorted(s.sample_id for s in val)
    assert len(set(val_ids)) == len(val_ids)
    for name in SPLIT_NAMES:
        for other in SPLIT_NAMES:
            if name != other:
                assert not set(splits[name]) & set(splits[other])
    assert all(splits.split_of(s.sample_id) == "train" for s in train)
    assert splits.split_of("unknown") is None


def test_deterministic_and_seed_dependent(split_inputs) -> None:
    train, val = split_inputs
    first = make_splits(train, val, seed=42)
    assert make_splits(train, val, seed=42) == first
    assert make_splits(train, list(reversed(val)), seed=42).val_calib == tuple(
        reversed(first.val_calib)
    )  # order of input does not change membership
    other = make_splits(train, val, seed=43)
    changed = sum(_assignment(first)[sid] != _assignment(other)[sid] for sid in _assignment(first))
    assert changed > len(val) / 3


def test_stable_under_additions_and_removals(split_inputs) -> None:
    train, val = split_inputs
    base = _assignment(make_splits(train, val, seed=5))
    more = val + _samples(400, 0.9, "newval", seed=9)
    grown = _assignment(make_splits(train + _samples(50, 0.8, "newtrain"), more, seed=5))
    assert all(grown[sid] == split for sid, split in base.items())
    shrunk = _assignment(make_splits(train[:10], val[::3], seed=5))
    assert all(base[sid] == split for sid, split in shrunk.items())


@pytest.mark.parametrize(("n", "seed"), [(2400, 42), (6000, 0), (6000, 1), (6000, 2), (6000, 3), (6000, 4)])
def test_stratified_within_two_points_per_class(n: int, seed: int) -> None:
    val = _samples(n, 0.9, "val", seed=seed + 100)
    splits = make_splits([], val, seed=seed)
    labels = np.array([s.label for s in val])
    for cls in (0, 1):
        overall = np.mean(labels == cls)
        for name, ratio in zip(VAL_SPLITS, splits.ratios):
            counts = splits.class_counts[name]
            share = counts[str(cls)] / (counts["0"] + counts["1"])
            assert abs(share - overall) <= 0.02, (cls, name, share, overall)
    positives = int(labels.sum())
    for name, ratio in zip(VAL_SPLITS, splits.ratios):
        assert abs(splits.class_counts[name]["1"] / positives - ratio) <= 0.02


def test_counts_per_split(split_inputs) -> None:
    train, val = split_inputs
    extra = _samples(40, 1.0, "extra", source="roadwork_extra")
    splits = make_splits(train + extra, val, seed=1)
    assert splits.class_counts["train"] == {
        "0": sum(s.label == 0 for s in train),
        "1": sum(s.label == 1 for s in train) + 40,
    }
    assert splits.source_counts["train"] == {"natix": 300, "roadwork_extra": 40}
    for name in VAL_SPLITS:
        members = set(splits[name])
        assert splits.class_counts[name]["1"] == sum(s.label for s in val if s.sample_id in members)
        assert splits.source_counts[name] == {"natix": len(members)}


def test_invalid_inputs_rejected(split_inputs) -> None:
    train, val = split_inputs
    with pytest.raises(SplitError, match="sum to 1"):
        make_splits(train, val, seed=0, ratios=(0.5, 0.3, 0.3))
    with pytest.raises(SplitError, match="3 entries"):
        make_splits(train, val, seed=0, ratios=(0.5, 0.5))
    with pytest.raises(SplitError, match="both training and validation"):
        make_splits(train, val + train[:2], seed=0)
    with pytest.raises(SplitError, match="duplicate sample id"):
        make_splits(train + train[:1], val, seed=0)


def test_select_returns_samples_in_split_order(split_inputs) -> None:
    train, val = split_inputs
    splits = make_splits(train, val, seed=3)
    selected = splits.select("val_test", val)
    assert [s.sample_id for s in selected] == list(splits.val_test)
    with pytest.raises(SplitError, match="not in the given samples"):
        splits.select("val_test", val[:10])
    with pytest.raises(KeyError, match="unknown split"):
        splits["test"]


# ----- splits.json -----


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema("splits"))


def test_document_contents(split_inputs) -> None:
    train, val = split_inputs
    doc = make_splits(train, val, seed=42).to_document()
    assert doc["seed"] == 42
    assert doc["ratios"] == {"val_select": 0.33, "val_calib": 0.33, "val_test": 0.34}
    assert "sha256" in doc["assignment"]
    assert doc["splits"]["val_select"]["usage"] == "val_select: checkpoint selection and early stopping only"
    assert doc["splits"]["val_calib"]["usage"] == "val_calib: fitting calibrators and exit policies only"
    assert doc["splits"]["val_test"]["usage"] == "val_test: final evaluation only"
    for name in SPLIT_NAMES:
        entry = doc["splits"][name]
        assert entry["role"] == SPLIT_ROLES[name] and entry["usage"] == USAGE_RULES[name]
        assert entry["n"] == len(entry["sample_ids"]) == sum(entry["class_counts"].values())


def test_save_load_round_trip(tmp_path: Path, split_inputs) -> None:
    train, val = split_inputs
    splits = make_splits(train, val, seed=42)
    path = save_splits(splits, tmp_path / "splits.json")
    loaded = load_splits(path, known_ids=[s.sample_id for s in train + val])
    assert loaded == splits
    assert json.loads(path.read_text())["splits"]["train"]["sample_ids"] == list(splits.train)


def _tampered(tmp_path: Path, split_inputs, edit) -> Path:
    train, val = split_inputs
    path = save_splits(make_splits(train, val, seed=42), tmp_path / "splits.json")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def test_load_rejects_schema_violations(tmp_path: Path, split_inputs) -> None:
    def extra_key(doc):
        doc["splits"]["val_test"]["note"] = "x"

    with pytest.raises(ArtifactError, match=r"\$\.splits\.val_test"):
        load_splits(_tampered(tmp_path, split_inputs, extra_key))

    def wrong_role(doc):
        doc["splits"]["val_test"]["role"] = "calibrate"

    with pytest.raises(ArtifactError, match="role"):
        load_splits(_tampered(tmp_path, split_inputs, wrong_role))

    def missing_counts(doc):
        del doc["splits"]["train"]["class_counts"]

    with pytest.raises(ArtifactError, match="class_counts"):
        load_splits(_tampered(tmp_path, split_inputs, missing_counts))


def test_load_rejects_overlapping_splits(tmp_path: Path, split_inputs) -> None:
    def leak(doc):
        leaked = doc["splits"]["val_test"]["sample_ids"][0]
        doc["splits"]["val_calib"]["sample_ids"].append(leaked)
        doc["splits"]["val_calib"]["n"] += 1
        doc["splits"]["val_calib"]["class_counts"]["1"] += 1
        doc["splits"]["val_calib"]["source_counts"]["natix"] += 1

    with pytest.raises(SplitError, match="disjoint"):
        load_splits(_tampered(tmp_path, split_inputs, leak))


def test_load_rejects_moved_ids_and_bad_counts(tmp_path: Path, split_inputs) -> None:
    def move(doc):
        moved = doc["splits"]["val_test"]["sample_ids"].pop()
        doc["splits"]["val_calib"]["sample_ids"].append(moved)
        for name, delta in (("val_test", -1), ("val_calib", 1)):
            doc["splits"][name]["n"] += delta
            doc["splits"][name]["class_counts"]["1"] += delta
            doc["splits"][name]["source_counts"]["natix"] += delta

    with pytest.raises(SplitError, match="not where the hash"):
        load_splits(_tampered(tmp_path, split_inputs, move))

    def miscount(doc):
        doc["splits"]["train"]["n"] += 1

    with pytest.raises(SplitError, match=r"\$\.splits\.train\.n"):
        load_splits(_tampered(tmp_path, split_inputs, miscount))

    def bad_ratios(doc):
        doc["ratios"]["val_test"] = 0.5

    with pytest.raises(SplitError, match="sum to 1"):
        load_splits(_tampered(tmp_path, split_inputs, bad_ratios))


def test_load_rejects_unknown_ids(tmp_path: Path, split_inputs) -> None:
    train, val = split_inputs
    path = save_splits(make_splits(train, val, seed=42), tmp_path / "splits.json")
    with pytest.raises(SplitError, match="not in the data set"):
        load_splits(path, known_ids=[s.sample_id for s in val])
    with pytest.raises(ArtifactError, match="file not found"):
        load_splits(tmp_path / "missing.json")


# ----- split roles -----


def test_require_split_allows_only_the_permitted_role() -> None:
    roles = sorted(set(SPLIT_ROLES.values()))
    for name in SPLIT_NAMES:
        for role in roles:
            if SPLIT_ROLES[name] == role:
                require_split(name, role)
            else:
                with pytest.raises(SplitError, match=f"split '{name}' may not be used to {role}"):
                    require_split(name, role)
    with pytest.raises(ValueError, match="unknown split"):
        require_split("test", "evaluate")
    with pytest.raises(ValueError, match="unknown role"):
        require_split("val_calib", "fit_calibrator")


def test_a_role_is_checked_on_the_rows_ids_not_on_a_name(split_inputs) -> None:
    splits = make_splits(*split_inputs, seed=3)
    assert split_of_ids(splits.val_calib[:5], splits) == "val_calib"
    assert require_role(splits.val_calib, "calibrate", splits) == "val_calib"
    # val_test's rows handed to a calibrator: refused whatever the caller named them (the old
    # require_split("val_calib", "calibrate") passed whatever rows came with it)
    with pytest.raises(SplitError, match="calibrator rows holds 5 image\\(s\\) of val_test.*may not be used to calibrate"):
        require_role(splits.val_test[:5], "calibrate", splits, "calibrator rows")
    with pytest.raises(SplitError, match="may not be used to select"):
        require_role(splits.train[:3], "select", splits)
    with pytest.raises(SplitError, match=r"mixes splits \(2 of val_calib, 1 of val_test\)"):
        split_of_ids([*splits.val_calib[:2], splits.val_test[0]], splits)
    with pytest.raises(SplitError, match="1 of 2 sample ids are in no split \\(first: 'stranger.jpg'\\)"):
        split_of_ids([splits.val_calib[0], "stranger.jpg"], splits)
    with pytest.raises(SplitError, match="has no sample ids"):
        split_of_ids([], splits)
