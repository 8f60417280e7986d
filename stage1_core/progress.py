"""Progress bars that are bars in a terminal and readable lines in a log file.

``progress(...)`` is ``tqdm`` with two settings chosen from where stderr goes: on a terminal it
redraws one bar; otherwise (a Dagster step, ``make demo`` writing its event log) it writes a
complete line at most every ``LOG_INTERVAL`` seconds instead of carriage-return redraws that a
log shows as one endless line.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 15.0


class _LineWriter:
    """A file wrapper that turns tqdm's carriage-return redraws into separate lines."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "")
        if text.strip():
            self.stream.write(text.rstrip("\n") + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` that suits the output: a bar on a TTY, sparse lines in a log."""
    stream = sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL * 4)
        kwargs.setdefault("ncols", 100)
        kwargs["file"] = _LineWriter(stream)
    return tqdm(iterable, **kwargs)
