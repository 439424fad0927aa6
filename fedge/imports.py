"""Resolving user code named as ``module:callable``.

Models and data are the user's: a job names its model factory and a device
its data loader by import path. Errors here are user mistakes, so each one is
a single line that says what to fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class ImportSpecError(ValueError):
    pass


def load_callable(spec: str, what: str = "factory") -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ImportSpecError(f"{what} {spec!r} must be written module:callable, e.g. fedge.models:digits_mlp")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ImportSpecError(
            f"{what} {spec!r}: module {exc.name!r} not found; check the spelling and that it is on PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ImportSpecError(
            f"{what} {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportSpecError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ImportSpecError(f"{what} {spec!r} is not callable")
    return obj
