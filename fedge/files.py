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


def writable_dir(path: str | Path, key: str) -> Path:
    """``path`` as a directory this process can write, made if missing;
    else the one-line ``ConfigError`` naming ``key`` (the setting that gave
    the path), the directory, the cause and the fix. Proved by creating and
    removing a file: permission bits say nothing for root, a read-only
    mount or a full disk."""
    from fedge.config import ConfigError

    root = Path(path)
    probe = root / f".fedge-write-test-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        blocking = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            cause = f"{'it' if blocking == root else blocking} is a file, not a directory"
        else:
            cause = exc.strerror or type(exc).__name__
            if exc.filename and Path(exc.filename) not in (root, probe):
                cause += f" ({exc.filename})"
        raise ConfigError(f"{key} {str(root)!r} cannot be written: {cause}; set {key} to a directory this "
                          "user can create and write, or fix its permissions") from None
    return root
