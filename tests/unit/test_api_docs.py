"""docs/API.md is generated from the docstrings, current, and its docstring references resolve."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_api", REPO / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_md_is_current_and_every_docstring_reference_resolves(capsys):
    gen = _generator()
    code = gen.main(["--check"])
    assert code == 0, capsys.readouterr().err
    text = (REPO / "docs" / "API.md").read_text()
    for title, module, names in gen.SECTIONS:
        assert f"## {title}" in text and all(f"### `{name}`" in text for name in names), module


def test_a_reference_to_a_missing_object_is_reported():
    gen = _generator()

    def documented() -> None:
        """Uses :func:`~stage1_core.training.trainer.train_head`, :class:`Splits` and
        :func:`stage1_core.training.trainer.no_such_function`."""

    documented.__module__ = "stage1_core.data.splits"
    problems = gen.broken_references([("x.documented", documented, None)])
    assert problems == ["x.documented: `stage1_core.training.trainer.no_such_function`"]
