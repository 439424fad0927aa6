"""The test suite on Python 3.13, the Python of Raspberry Pi OS's current
release (Debian trixie): a Debian trixie amd64 root built with debootstrap
(``tests/py313/rootfs.sh``, cached in ``~/.cache/fedge-py313``), its
python3 and Debian's mosquitto, openssl, prometheus and qemu-user, a
virtualenv with PyTorch and ``pip install -e ".[dev]"`` of a copy of this
checkout, and inside it, under chroot, ``make test``'s lint and pytest run.

Not part of ``make test``: it builds a root file system (root, debootstrap;
about 3 minutes and 7 GB the first time: PyPI's x86_64 torch brings CUDA's
libraries) and runs the whole suite again (about 15 minutes on 2 cores).
``make test-py313`` runs it.

- ``FEDGE_PY313_ROOT``: the root (default ``~/.cache/fedge-py313/root``).
- ``FEDGE_PY313_PYTEST``: pytest's arguments inside instead of ``-x`` (the
  whole suite, stopping at the first failure), e.g. ``tests/unit -k codecs``
  or ``""`` for the whole suite without stopping.
- ``FEDGE_PY313_TIMEOUT``: seconds the suite may take (default 3600).
- ``FEDGE_PY313_LOG``: where the suite's output goes (default
  ``~/.cache/fedge-py313/suite.log``).

MNIST: ``$FEDGE_DATA``, when set, is bind-mounted read-only inside at
``/work/shared/data`` and is ``$FEDGE_DATA`` there (and the ``../shared/data``
beside the copy at ``/work/main``); without it the tests that need MNIST skip
inside, as they do here.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root

pytestmark = pytest.mark.py313

CACHE = Path.home() / ".cache" / "fedge-py313"
ROOT = Path(os.environ.get("FEDGE_PY313_ROOT", str(CACHE / "root")))
LOG = Path(os.environ.get("FEDGE_PY313_LOG", str(CACHE / "suite.log")))
SCRIPT = REPO / "tests" / "py313" / "rootfs.sh"
INSIDE = "/work/main"  # the copy; /work/shared/data beside it is the MNIST
PYTHON = "/opt/venv/bin/python"
# Passed on from this environment when set: OpenBLAS's CPU type on these
# machines (older builds crash or compute wrong results without it), CI.
PASSED_ON = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CI")


def _data() -> Path | None:
    """The host's MNIST directory, when FEDGE_DATA names one that holds it."""
    data = os.environ.get("FEDGE_DATA")
    if data and (Path(data).expanduser() / "mnist.npz").is_file():
        return Path(data).expanduser().resolve()
    return None


def _env() -> dict[str, str]:
    env = {"PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    if _data():
        env["FEDGE_DATA"] = "/work/shared/data"
    env.update({k: os.environ[k] for k in PASSED_ON if k in os.environ})
    return env


def _in_root() -> list[int]:
    """Processes whose root directory is ROOT: what ran inside and is left."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "root") == str(ROOT):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _kill_leftovers() -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _in_root()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and _in_root():
            time.sleep(0.2)


def run_inside(*cmd: str, timeout: float, log: Path | None = None) -> tuple[int, str]:
    """``cmd`` in ROOT under chroot from the copy's directory, in its own
    process group: killed with everything it started when it overruns."""
    out_path = log or CACHE / "last-command.log"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out:
        proc = subprocess.Popen(["chroot", str(ROOT), "sh", "-c", 'cd "$0" && exec "$@"', INSIDE, *cmd],
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -1
    _kill_leftovers()
    text = out_path.read_text(errors="replace")
    if code == -1:
        text += f"\n[test_py313] {' '.join(cmd)}: killed after {timeout:.0f} s\n"
        out_path.write_text(text)
    return code, text


@pytest.fixture(scope="module")
def root():
    require_root("make test-py313 (debootstrap, chroot, mount)")
    data = _data()
    started = time.monotonic()
    build = subprocess.run(["bash", str(SCRIPT), str(ROOT), str(REPO), *([str(data)] if data else [])],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, f"rootfs.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    print(f"\n{build.stdout.strip().splitlines()[-1]} (ready in {time.monotonic() - started:.0f} s)")
    try:
        yield ROOT
    finally:
        _kill_leftovers()
        subprocess.run(["bash", str(SCRIPT), str(ROOT), "--umount"], check=False, timeout=120)


def test_the_root_is_python_313(root):
    code, out = run_inside(PYTHON, "-c", "import sys; print(sys.version_info[:2] == (3, 13), sys.version)",
                           timeout=120)
    assert code == 0 and out.startswith("True"), out


def test_lint_passes_on_python_313(root):
    """``make lint`` inside: ruff, and mypy with the packages 3.13 resolves."""
    code, out = run_inside("sh", "-c", "ruff check . && mypy fedge fedge_cli aggregator edge_agent export",
                           timeout=1200)
    assert code == 0, out[-5000:]


def test_the_suite_passes_on_python_313(root):
    extra = os.environ.get("FEDGE_PY313_PYTEST")
    args = shlex.split(extra) if extra is not None else ["-x"]
    timeout = float(os.environ.get("FEDGE_PY313_TIMEOUT", "3600"))
    started = time.monotonic()
    code, out = run_inside(PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, timeout=timeout, log=LOG)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    print(f"\nPython 3.13: {summary} ({time.monotonic() - started:.0f} s; output in {LOG})")
    assert code == 0, out[-8000:]
