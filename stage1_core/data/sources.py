"""Where the training sources live: NATIX plus the optional extra roadwork sets.

Layouts as the baseline script read them: the ROADWork (ICCV) and Roboflow extras keep
``<dir>/train_images/`` and ``<dir>/train_labels.csv``; the Kaggle sets keep ``<dir>/train/`` and
``<dir>/train_labels.csv`` (CSV rows ``image,label``, image names relative to the image folder).
An optional source that is absent stops the run with every problem listed, unless
``skip_missing_sources`` is on: then the run goes on without it and names what it left out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LABELS_NAME = "train_labels.csv"
#: ``(source name, switch field, directory field, image folder)`` of every optional source.
EXTRA_SOURCES: tuple[tuple[str, str, str, str], ...] = (
    ("roadwork_iccv", "use_extra_roadwork", "roadwork_iccv_dir", "train_images"),
    ("roadwork_extra", "use_extra_roadwork", "roadwork_extra_dir", "train_images"),
    ("kaggle_construction", "use_kaggle_data", "kaggle_construction_dir", "train"),
    ("kaggle_road_issues", "use_kaggle_data", "kaggle_road_issues_dir", "train"),
)


def _absence(root: str | None, field: str, images: str) -> str | None:
    """Why the source at ``root`` cannot be read (None when it can)."""
    if not root:
        return f"{field} is not set"
    base = Path(root)
    if not base.is_dir():
        return f"{field}={root!r} does not exist"
    lacking = [str(base / name) for name in (images, LABELS_NAME) if not (base / name).exists()]
    return f"{field}={root!r} lacks {' and '.join(lacking)}" if lacking else None


def missing_extra_sources(config: Any) -> dict[str, str]:
    """The switched-on optional sources that are absent: source name -> why."""
    missing = {}
    for name, switch, field, images in EXTRA_SOURCES:
        if getattr(config, switch, False):
            why = _absence(getattr(config, field, None), field, images)
            if why:
                missing[name] = why
    return missing


def training_sources(config: Any) -> list[tuple[str, str, str]]:
    """``(source, image_dir, labels_file)`` of NATIX and every switched-on optional source.

    With ``skip_missing_sources`` the absent optional sources are left out, each named in a
    warning; without it they stay in the list (and the run's data check refuses them).
    """
    sources = [("natix", str(config.train_image_dir), str(config.train_labels_file))]
    skipped = missing_extra_sources(config) if getattr(config, "skip_missing_sources", False) else {}
    for name, switch, field, images in EXTRA_SOURCES:
        if not getattr(config, switch, False):
            continue
        if name in skipped:
            logger.warning("skip_missing_sources: training without optional source %s (%s)", name, skipped[name])
            continue
        root = Path(getattr(config, field) or "")
        sources.append((name, str(root / images), str(root / LABELS_NAME)))
    return sources
