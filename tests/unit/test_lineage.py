"""Lineage ids change when, and only when, an input changes; stale inputs are refused by name."""

from __future__ import annotations

import pytest

from stage1_core.lineage import StaleInputError, check_inputs, content_id, make_record, read_record


def write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)


def build(tmp_path, index_text="a,1\n", seed=0, target=0.02):
    """A three-step chain: dataset_index -> splits -> exit_policy[phase1]."""
    write(tmp_path / "dataset_index", "index.csv", index_text)
    index = make_record(tmp_path / "dataset_index", "dataset_index", None, [], {}, ["index.csv"])
    write(tmp_path / "splits", "splits.json", "{}")
    splits = make_record(tmp_path / "splits", "splits", None, [index], {"split_seed": seed}, ["splits.json"])
    write(tmp_path / "exit_policy" / "phase1", "thresholds.json", "{}")
    policy = make_record(tmp_path / "exit_policy" / "phase1", "exit_policy", "phase1", [splits],
                         {"target_fnr_exit": target}, ["thresholds.json"])
    return index, splits, policy


def current_from(tmp_path):
    def current(name):
        asset, _, partition = name.partition("[")
        partition = partition.rstrip("]") or None
        directory = tmp_path / asset / partition if partition else tmp_path / asset
        return read_record(directory, asset, partition) if (directory / "lineage.json").is_file() else None

    return current


def test_content_id_is_deterministic_and_order_insensitive_for_mappings():
    assert content_id({"a": 1, "b": 2}) == content_id({"b": 2, "a": 1})
    assert content_id({"a": 1}) != content_id({"a": 2})
    assert len(content_id("x")) == 24


def test_ids_change_when_and_only_when_an_input_changes(tmp_path):
    first = build(tmp_path / "one")
    same = build(tmp_path / "two")
    assert [r.id for r in first] == [r.id for r in same]
    relabelled = build(tmp_path / "three", index_text="a,0\n")
    assert all(a.id != b.id for a, b in zip(first, relabelled))
    reseeded = build(tmp_path / "four", seed=1)
    assert reseeded[0].id == first[0].id and reseeded[1].id != first[1].id and reseeded[2].id != first[2].id
    assert first[2].chain == {"dataset_index": first[0].id, "splits": first[1].id}


def test_a_rebuilt_ancestor_makes_its_descendants_stale(tmp_path):
    _, _, policy = build(tmp_path)
    write(tmp_path / "dataset_index", "index.csv", "a,0\n")
    make_record(tmp_path / "dataset_index", "dataset_index", None, [], {}, ["index.csv"])
    with pytest.raises(StaleInputError) as info:
        check_inputs("evaluation[phase1]", [policy], current_from(tmp_path))
    message = str(info.value)
    assert "exit_policy[phase1] was made from dataset_index" in message and "re-materialise exit_policy[phase1]" in message


def test_a_changed_file_is_refused(tmp_path):
    _, _, policy = build(tmp_path)
    (tmp_path / "exit_policy" / "phase1" / "thresholds.json").write_text('{"exit_threshold": 0.5}')
    with pytest.raises(StaleInputError, match="thresholds.json changed since it was written"):
        check_inputs("evaluation[phase1]", [policy], current_from(tmp_path))


def test_live_parameters_that_differ_from_the_recorded_ones_are_refused(tmp_path):
    _, _, policy = build(tmp_path)
    check_inputs("bundle[phase1]", [policy], current_from(tmp_path), lambda name: None)
    wanted = {"exit_policy[phase1]": {"target_fnr_exit": 0.1}}
    with pytest.raises(StaleInputError, match=r"target_fnr_exit=0.02 \(config now 0.1\)"):
        check_inputs("bundle[phase1]", [policy], current_from(tmp_path), wanted.get)


def test_inputs_made_from_different_ancestors_disagree(tmp_path):
    _, _, old_policy = build(tmp_path)
    write(tmp_path / "dataset_index", "index.csv", "b,1\n")
    index = make_record(tmp_path / "dataset_index", "dataset_index", None, [], {}, ["index.csv"])
    write(tmp_path / "other", "x.json", "{}")
    other = make_record(tmp_path / "other", "other", None, [index], {}, ["x.json"])
    with pytest.raises(StaleInputError, match="were made from different dataset_index"):
        check_inputs("bundle[phase1]", [old_policy, other], current_from(tmp_path))


def test_a_missing_record_names_what_to_materialise(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialise checkpoint\\[phase1\\] first"):
        read_record(tmp_path / "checkpoint" / "phase1", "checkpoint", "phase1")
