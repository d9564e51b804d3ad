"""File-system durability helpers shared by every persisted format."""
from __future__ import annotations

import os


def fsync_dir(directory) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
