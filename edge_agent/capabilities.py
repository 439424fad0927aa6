"""What a device tells the aggregator about itself (in its presence message):
memory, cores, architecture, board, software versions and supported codecs.
Reads files and package metadata only; never imports PyTorch."""

from __future__ import annotations

import importlib.util
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import fedge
from fedge import codecs
from fedge.cpu import board_model
from fedge.secagg import CAPABILITY as SECAGG


def _mem_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _secagg_installed() -> bool:
    """PyCryptodome (fedge[secagg]) is there: without it the device does not
    offer secure aggregation, so it is never chosen for a secure round it
    could not finish. Found, not imported: an idle agent does not load it."""
    try:
        return importlib.util.find_spec("Crypto") is not None
    except (ImportError, ValueError):
        return False


def describe(role: str = "trainer") -> dict[str, Any]:
    return {
        "role": role,
        "ram_mb": _mem_mb(),
        "cpus": os.cpu_count() or 1,
        "arch": platform.machine(),
        "board": board_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "fedge": fedge.__version__,
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "codecs": [*codecs.supported(), *([SECAGG] if _secagg_installed() else [])],
    }
