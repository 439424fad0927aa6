"""The systemd tests run only from ``make test-systemd`` (FEDGE_SYSTEMD=1):
they build a Debian root file system and boot systemd in it."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEDGE_SYSTEMD") == "1":
        return
    skip = pytest.mark.skip(reason="boots systemd in a container: run make test-systemd")
    for item in items:
        if "systemd" in item.keywords:
            item.add_marker(skip)
