"""What travels between the torchrun job and the asset: the step result, the command, the threads."""

from __future__ import annotations

import json

from stage1_assets.distributed import decode_result, threads_per_rank, torchrun_command
from stage1_pipes.child import encode, result_message


def test_the_step_result_survives_the_trip_through_pipes(tmp_path):
    class Result:
        path = tmp_path / "a.json"
        metadata = {"n": 3, "where": tmp_path, "nested": {"p": tmp_path / "b"}, "none": None}
        tables = {"rows": [{"split": "train", "n": 3}]}
        figures = {"curve": tmp_path / "c.png"}
        data_version = "abc"

    back = decode_result(json.loads(json.dumps(result_message(Result()))))
    assert back.metadata == Result.metadata and back.tables == Result.tables and back.figures == Result.figures
    assert back.path == Result.path and back.data_version == "abc" and encode((1, 2)) == [1, 2]
    command = torchrun_command("cached_features", "phase1", tmp_path, tmp_path / "c.json", 2)
    assert "--nproc-per-node=2" in command and command[command.index("-m", 3) + 1] == "stage1_pipes.child"
    assert threads_per_rank(64) == 1
