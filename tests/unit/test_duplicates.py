"""Byte-identical images: kept once inside a split, dropped from validation across splits, refused on conflict."""

from __future__ import annotations

from pathlib import Path

import pytest

from stage1_core.data.datasets import Sample
from stage1_core.data.duplicates import (
    INSIDE_TRAIN,
    INSIDE_VAL,
    VAL_IN_TRAIN,
    VAL_IN_UNLABELED,
    ConflictingDuplicatesError,
    resolve_duplicates,
)


def sample(name: str, label: int, source: str = "natix", line: int = 2) -> Sample:
    return Sample(name, Path(f"/data/{name}.jpg"), label, source, line)


def test_no_duplicates_keeps_everything_in_order():
    train = [sample("a", 1), sample("b", 0)]
    val = [sample("c", 1)]
    report = resolve_duplicates(train, val, {"a": "h1", "b": "h2", "c": "h3"})
    assert report.train == train and report.val == val and report.dropped == []


def test_copy_inside_train_is_kept_once_first_in_source_order():
    train = [sample("a", 1, line=2), sample("b", 0, line=3), sample("a2", 1, line=4)]
    report = resolve_duplicates(train, [], {"a": "h1", "b": "h2", "a2": "h1"})
    assert [s.sample_id for s in report.train] == ["a", "b"]
    (dropped,) = report.dropped
    assert dropped.sample.sample_id == "a2" and dropped.reason == INSIDE_TRAIN
    assert dropped.kept_path == Path("/data/a.jpg") and dropped.row()["dropped_line"] == 4


def test_copy_inside_validation_is_kept_once_so_it_cannot_reach_two_val_splits():
    val = [sample("v1", 1), sample("v2", 1)]
    report = resolve_duplicates([], val, {"v1": "h", "v2": "h"})
    assert [s.sample_id for s in report.val] == ["v1"]
    assert [d.reason for d in report.dropped] == [INSIDE_VAL]


def test_validation_copy_of_a_training_image_is_dropped_from_validation():
    train = [sample("t", 1, source="natix_train")]
    val = [sample("v", 1), sample("w", 0)]
    report = resolve_duplicates(train, val, {"t": "h", "v": "h", "w": "h2"})
    assert [s.sample_id for s in report.train] == ["t"]
    assert [s.sample_id for s in report.val] == ["w"]
    (dropped,) = report.dropped
    assert dropped.reason == VAL_IN_TRAIN and dropped.kept_path == Path("/data/t.jpg")
    assert report.count(VAL_IN_TRAIN) == 1


def test_every_validation_copy_of_a_training_image_is_dropped():
    train = [sample("t", 1)]
    val = [sample("v1", 1), sample("v2", 1)]
    report = resolve_duplicates(train, val, {"t": "h", "v1": "h", "v2": "h"})
    assert report.val == [] and report.count(VAL_IN_TRAIN) == 2


def test_validation_image_in_the_unlabeled_folder_is_dropped():
    val = [sample("v", 1), sample("w", 0)]
    report = resolve_duplicates([], val, {"v": "h", "w": "h2"}, unlabeled={"h": Path("/extra/x.jpg")})
    assert [s.sample_id for s in report.val] == ["w"]
    (dropped,) = report.dropped
    assert dropped.reason == VAL_IN_UNLABELED and dropped.kept_path == Path("/extra/x.jpg")


def test_training_image_in_the_unlabeled_folder_is_kept():
    train = [sample("t", 1)]
    report = resolve_duplicates(train, [], {"t": "h"}, unlabeled={"h": Path("/extra/x.jpg")})
    assert report.train == train and report.dropped == []


@pytest.mark.parametrize("where", ["train", "across"])
def test_copies_with_conflicting_labels_are_refused_with_every_path_and_line(where):
    first = sample("a", 1, source="natix_train", line=7)
    second = sample("b", 0, source="natix_train" if where == "train" else "natix", line=9)
    train, val = ([first, second], []) if where == "train" else ([first], [second])
    with pytest.raises(ConflictingDuplicatesError) as info:
        resolve_duplicates(train, val, {"a": "h", "b": "h"},
                           labels_file_of={"natix_train": "/csv/train.csv", "natix": "/csv/val.csv"})
    message = str(info.value)
    assert "/csv/train.csv:7: /data/a.jpg (label 1)" in message
    assert f"{'/csv/train.csv' if where == 'train' else '/csv/val.csv'}:9: /data/b.jpg (label 0)" in message
