"""Data and model callables that tests name by import path (the training
worker imports them in its own process, as it would a user's code)."""

from __future__ import annotations

import time

from fedge import datasets


def hang(seconds: float = 60.0):
    time.sleep(seconds)
    raise RuntimeError("unreachable")


def slow_digits(delay: float = 5.0, **kwargs):
    """The digits share of a client, after a delay: a device that is still
    training when a test pulls its plug."""
    time.sleep(delay)
    return datasets.digits(**kwargs)
