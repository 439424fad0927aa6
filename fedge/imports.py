"""Resolving user code named as ``module:callable``.

Models and data are the user's: a job names its model factory and a device
its data loader by import path, found on the path or, as ``python -m`` finds
it, in the current directory. Errors here are user mistakes, so each one is
a single line that says what to fix.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.errors import OneReasonError


class ImportSpecError(OneReasonError):
    """A ``module:callable`` that cannot be imported or called: one line naming the fix."""

    default_reason = "import"


def _import(module_name: str) -> Any:
    """Import as ``python -m`` would: the current directory is searched too
    (after the path, so a local file never shadows an installed package)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        local = Path(cwd, f"{top}.py").is_file() or Path(cwd, top).is_dir()
        if exc.name != top or not local or cwd in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def load_callable(spec: str, what: str = "factory") -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ImportSpecError(f"{what} {spec!r} must be written module:callable, e.g. fedge.models:digits_mlp")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as exc:
        raise ImportSpecError(
            f"{what} {spec!r}: module {exc.name!r} not found on PYTHONPATH or in the current directory "
            f"({os.getcwd()}); check the spelling, or run from the folder that holds it"
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
