"""The arm64 tests run only from ``make test-arm64`` (FEDGE_ARM64=1): they
build a root file system and install PyTorch under emulation."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEDGE_ARM64") == "1":
        return
    skip = pytest.mark.skip(reason="arm64 under emulation: run make test-arm64")
    for item in items:
        if "arm64" in item.keywords:
            item.add_marker(skip)
