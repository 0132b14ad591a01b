"""Data folders for servers started as processes: one each, since a folder serves one server."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import config


def fresh_data_dir() -> Path:
    """A new, empty data folder next to the default one, enterable by sandboxed uids."""
    parent = config.default_data_dir().absolute() / "tests"
    parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for folder in (parent.parent, parent):
            folder.chmod(0o755)
    made = Path(tempfile.mkdtemp(prefix="serve-", dir=parent))
    made.chmod(0o755)
    return made


def remove_data_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
