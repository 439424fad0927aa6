"""File handling every command shares: digests, atomic writes, and the
rule that an existing output is never overwritten without ``--force``."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from export.errors import ExportError
from fedge.files import atomic_write


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_outputs(paths: Iterable[str | Path], force: bool) -> None:
    """Refuse to replace an existing file unless ``force``; check the folder exists."""
    for path in paths:
        p = Path(path)
        if p.exists() and not force:
            raise ExportError(f"output {str(p)!r} already exists; pass --force to overwrite it or choose another path")
        if not p.parent.is_dir():
            raise ExportError(f"output folder {str(p.parent)!r} does not exist; create it first")


def temp_path_beside(path: str | Path, suffix: str = "") -> Path:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=str(p.parent))
    os.close(fd)
    return Path(tmp)


def replace_atomically(tmp: str | Path, final: str | Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write atomically (temp file, fsync, rename): a reader never sees half a file."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())
    return Path(path)
