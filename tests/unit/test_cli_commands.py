"""The lead's ``stage1`` subcommands: synth, bundle verify, summary (predict runs in the e2e tests)."""

import json

from stage1_core.cli import main


def test_synth_writes_the_natix_layout(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--n-train", "6", "--n-val", "8", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_train"] == 6 and summary["n_val"] == 8
    lines = (out / "val_labels.csv").read_text().splitlines()
    assert lines[0] == "image,label" and len(lines) == 9
    assert all((out / "val" / line.split(",")[0]).is_file() for line in lines[1:])


def test_bundle_verify_lists_problems_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "bundle.json").write_text("{}")
    assert main(["bundle", "verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "INVALID bundle" in err and "bundle.json" in err


def test_summary_without_artifacts_exits_nonzero_and_says_so(tmp_path, capsys):
    assert main(["summary", "--phase", "phase1", "--artifacts_root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "not run" in out and "NO CURRENT BUNDLE" in out
    assert "None" not in out


def test_phase_skip_and_unskip(tmp_path, capsys):
    from stage1_core.phase_state import read_skip

    root = str(tmp_path / "artifacts")
    assert main(["phase", "skip", "phase5", "--reason", "no budget", "--artifacts_root", root]) == 0
    assert "phase5 skipped" in capsys.readouterr().out
    assert read_skip(tmp_path / "artifacts", "phase5")["reason"] == "no budget"
    assert main(["phase", "skip", "phase4", "--reason", "x", "--artifacts_root", root]) == 2
    assert "phase4 is not optional" in capsys.readouterr().err
    assert main(["phase", "skip", "phase5", "--artifacts_root", root]) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert main(["phase", "unskip", "phase5", "--artifacts_root", root]) == 0
    assert read_skip(tmp_path / "artifacts", "phase5") is None
