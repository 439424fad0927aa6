"""Crash-safe file writes, for every role's state directory.

Write to a temporary file beside the target, flush, fsync, rename over the
target, fsync the directory: after a SIGKILL or a power cut the target holds
either its old bytes or its new bytes, never a mix. ``durable=False`` keeps
the rename (safe against a crashed process) but skips the fsyncs (not safe
against a power cut): for simulated devices sharing one disk.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
