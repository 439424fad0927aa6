"""``fedge data``: the built-in data sets fedge does not ship, where they are
looked for, and getting them there.

    fedge data [list] [--json]      each data set: where it is looked for, there or not, checksum
    fedge data fetch mnist          download keras' mnist.npz into the data directory, checked
    fedge data import mnist FILE    copy a mnist.npz you have into place, checked

The data directory is ``$FEDGE_DATA`` when set, else the user cache
(``$XDG_CACHE_HOME/fedge`` or ``~/.cache/fedge``): where ``fedge.datasets``
reads from. Mistakes and failures (no network, a file that is not the data)
are one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# The one data set kept in a file today; ``fedge data fetch`` takes these names.
FETCHABLE = ("mnist",)


def _fail(exc: Exception) -> Any:
    from fedge_cli.main import UsageError

    raise UsageError(str(exc)) from None


def _sklearn_state() -> tuple[str, str]:
    import importlib.util

    try:
        found = importlib.util.find_spec("sklearn") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return "ok", "ships with scikit-learn, loaded offline"
    return "missing", "ships with scikit-learn, which is not installed: pip install 'fedge[demo]'"


def rows() -> tuple[list[dict[str, str]], str, str]:
    """One row per built-in data set (name, state, path, detail), the data
    directory and where it came from."""
    from fedge import datasets

    directory, origin = datasets.data_dir()
    out: list[dict[str, str]] = []
    for f in datasets.FILES.values():
        check = datasets.check_file(f, directory / f.filename)
        detail = check.detail
        if check.state == "missing":
            detail = f"not there: run `fedge data fetch {f.name}` (or `fedge data import {f.name} FILE`)"
        elif check.state == "mismatch":
            detail += f"; replace it: `fedge data fetch {f.name} --force`"
        out.append({"name": f.name, "state": check.state, "path": str(check.path), "detail": detail})
    state, detail = _sklearn_state()
    for name in datasets.SKLEARN_SETS:
        out.append({"name": name, "state": state, "path": "", "detail": detail})
    return out, str(directory), origin


def cmd_list(args: argparse.Namespace) -> int:
    from fedge.datasets import DataError

    try:
        table, directory, origin = rows()
    except DataError as exc:
        _fail(exc)
    if args.json:
        print(json.dumps({"directory": directory, "from": origin, "datasets": table}, indent=2))
        return 0
    hint = "" if origin == "FEDGE_DATA" else " (set FEDGE_DATA to use another directory)"
    print(f"data directory: {directory}, from {origin}{hint}")
    for r in table:
        where = f"{r['path']}: " if r["path"] else ""
        print(f"{r['name']:<14} {r['state']:<9} {where}{r['detail']}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from fedge import datasets

    if not args.timeout > 0:
        _fail(ValueError(f"--timeout {args.timeout:g} must be a number of seconds > 0"))
    try:
        check, downloaded = datasets.fetch(args.name, url=args.url, force=args.force, timeout=args.timeout)
    except datasets.DataError as exc:
        _fail(exc)
    print(f"{check.path}: {'downloaded' if downloaded else 'already there'}, {check.detail}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fedge import datasets

    try:
        check, copied = datasets.import_file(args.name, args.file, force=args.force)
    except datasets.DataError as exc:
        _fail(exc)
    print(f"{check.path}: {'copied from ' + args.file if copied else 'already there'}, {check.detail}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.action in (None, "list"):
        return cmd_list(args)
    return {"fetch": cmd_fetch, "import": cmd_import}[args.action](args)


def add_commands(sub: Any) -> None:
    d = sub.add_parser("data", help="the built-in data sets: where they are looked for, fetch or import them",
                       description="Built-in data sets fedge does not ship are read from $FEDGE_DATA when set, "
                                   "else from the user cache ($XDG_CACHE_HOME/fedge or ~/.cache/fedge).")
    d.add_argument("--json", action="store_true", help="list as JSON (for scripts)")
    dd = d.add_subparsers(dest="action", metavar="ACTION")
    ls = dd.add_parser("list", help="each data set: where it is looked for, whether it is there, its checksum "
                                    "(the default action)")
    # SUPPRESS: `fedge data --json list` keeps the --json given before the action.
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print it as JSON (for scripts)")
    fe = dd.add_parser("fetch", help="download a data set's file from its public URL into the data directory, "
                                     "checked before it is put in place")
    fe.add_argument("name", metavar="NAME", help=f"the data set ({', '.join(FETCHABLE)})")
    fe.add_argument("--force", action="store_true",
                    help="download even when a file is there, and replace it (one that is not the data is kept "
                         "without this flag)")
    fe.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for the server (default 30)")
    # Where to download from instead of the data set's public URL (tests, mirrors).
    fe.add_argument("--url", default=None, help=argparse.SUPPRESS)
    im = dd.add_parser("import", help="copy a data set's file you already have into the data directory, "
                                      "after checking its checksum")
    im.add_argument("name", metavar="NAME", help=f"the data set ({', '.join(FETCHABLE)})")
    im.add_argument("file", metavar="FILE", help="the file you have (for mnist, keras' mnist.npz)")
    im.add_argument("--force", action="store_true", help="replace a file that is there and holds something else")
    d.set_defaults(func=cmd_data, default_level="WARNING")
