"""Durable file writes shared by the services (no gRPC here).

A run directory (coordinator) and a model directory (learner) must survive ``kill -9`` at any moment:
readers see either the old or the whole new file, and a file that was reported written is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` atomically and durably (temporary file ``.NAME.tmpPID``, fsync, rename,
    fsync of the directory); returns the bytes written.  An interrupted write leaves only the temporary
    file, which the owners of the directories remove on start."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data)
