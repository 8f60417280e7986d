"""An artifact's own log file: what a step logged while it made the artifact, kept beside it.

Dagster's event log holds a run's messages, but it lives in the instance, not with the artifact;
a policy certified last week should still say how. :func:`artifact_log` captures the records of
the ``stage1_core`` loggers (INFO and up) emitted inside its block and writes them, with the
summary lines the step adds through the yielded logger, to one file atomically when the block
ends - also when it fails, with the error last.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stage1_core.artifacts import atomic_write_text

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def artifact_log(path: str | Path, logger_name: str = "stage1_core") -> Iterator[logging.Logger]:
    """Capture ``logger_name``'s records inside the block into ``path`` (written atomically at the end)."""
    logger = logging.getLogger(logger_name)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger
    except BaseException as exc:
        logger.error("failed: %s: %s", type(exc).__name__, exc)
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.flush()
        atomic_write_text(path, buffer.getvalue())


def log_figures(logger: logging.Logger, title: str, figures: Mapping[str, Any]) -> None:
    """One INFO line per figure (``title: key = value``), skipping paths and nested tables."""
    for key, value in figures.items():
        if isinstance(value, (Path, list, dict)):
            continue
        logger.info("%s: %s = %s", title, key, value)
