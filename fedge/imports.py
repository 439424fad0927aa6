"""Resolving user code named as ``module:callable``.

Models and data are the user's: a job names its model factory and a device
its data loader by import path, found on the path or, as ``python -m`` finds
it, in the current directory. Errors here are user mistakes, so each one is
a single line that says what to fix.

``find_callable`` answers whether such a name would resolve without running
any of the user's code (nor importing PyTorch, which a data module
usually does): an agent checks its ``data.factory`` at start that way, and
loads it only in the training worker.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
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


def _split(spec: str, what: str) -> tuple[str, str]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ImportSpecError(f"{what} {spec!r} must be written module:callable, e.g. fedge.models:digits_mlp")
    return module_name, attr


def _find_spec(name: str, path: list[str] | None) -> importlib.machinery.ModuleSpec | None:
    """The spec the import system would use for ``name`` (its parent's
    ``path`` given), found without importing anything."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return getattr(loaded, "__spec__", None)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path, None)
        except (ImportError, ValueError, TypeError):
            continue
        if spec is not None:
            return spec
    return None


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds at its top level (in ``if``/``try`` blocks too);
    None when it may bind others (``from x import *``, module ``__getattr__``)."""
    names: set[str] = set()
    body: list[ast.stmt] = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    body.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return None if "__getattr__" in names else names


def find_callable(spec: str, what: str = "factory") -> None:
    """Raise the one-line ``ImportSpecError`` ``load_callable`` would for a
    ``spec`` whose module cannot be found or whose source does not define the
    name, without importing it: its packages' ``__init__`` and the module
    itself stay unrun. A module that is not Python source (compiled), or that
    can bind names this cannot see, passes when it is found."""
    module_name, attr = _split(spec, what)
    path: list[str] | None = None
    found = None
    parts = module_name.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        found = _find_spec(name, path)
        if found is None and i == 0:  # as ``python -m`` would: the current directory too (see ``_import``)
            found = importlib.machinery.PathFinder.find_spec(name, [os.getcwd()])
        if found is None:
            raise ImportSpecError(
                f"{what} {spec!r}: module {name!r} not found on PYTHONPATH or in the current directory "
                f"({os.getcwd()}); check the spelling, or run from the folder that holds it"
            )
        path = list(found.submodule_search_locations or [])
    assert found is not None
    origin = found.origin
    if not origin or not origin.endswith(".py"):
        return
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImportSpecError(f"{what} {spec!r}: {origin} cannot be read as Python: {exc}") from None
    names = _top_level_names(tree)
    head = attr.split(".")[0]
    if names is None or head in names:
        return
    if found.submodule_search_locations and _find_spec(f"{module_name}.{head}", path) is not None:
        return  # a package's submodule
    raise ImportSpecError(f"{what} {spec!r}: {module_name!r} has no attribute {head!r} ({origin} does not define "
                          "it); check the name after the colon")


_FIND_IN_CHILD = (
    "import json, sys\n"
    "from fedge.imports import ImportSpecError, find_callable\n"
    "try:\n"
    "    find_callable(sys.argv[1], sys.argv[2])\n"
    "except ImportSpecError as exc:\n"
    "    print(json.dumps(str(exc)))\n"
)


def find_callable_in(python: str, spec: str, what: str = "factory") -> None:
    """``find_callable`` as another interpreter (``python``, with fedge on
    its path as the training worker has it) sees ``spec``."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run([python, "-c", _FIND_IN_CHILD, spec, what], env=env, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImportSpecError(f"{what} {spec!r}: {python} could not look for it: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImportSpecError(f"{what} {spec!r}: {python} could not look for it: {last}")
    if proc.stdout.strip():
        raise ImportSpecError(json.loads(proc.stdout.strip().splitlines()[-1]))
