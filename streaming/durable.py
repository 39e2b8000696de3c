"""Durability helpers shared by the offline log, the feature job and the adapter registry."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory: a rename or a new entry in it is durable only once the directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
