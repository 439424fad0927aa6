"""The test suite on each Python fedge supports beyond the host's, in the
distribution a device runs it on:

- Python 3.10: Ubuntu 22.04 (jammy), the base of a Jetson's JetPack 6, whose
  PyTorch is built for that system Python;
- Python 3.13: Debian trixie, the base of Raspberry Pi OS's current release.

For each, an amd64 root built with debootstrap (``tests/pyversions/rootfs.sh``,
cached in ``~/.cache/fedge-pyversions/DIST``), its python3 and its mosquitto,
openssl, prometheus and qemu-user, a virtualenv with PyTorch and
``pip install -e ".[dev]"`` of a copy of this checkout, and inside it, under
chroot, ``make test``'s lint and pytest run.

Not part of ``make test``: each root is built once (root, debootstrap; a few
minutes and about 7 GB: PyPI's x86_64 torch brings CUDA's libraries), and the
whole suite runs again in each (about 15 minutes on 2 cores).
``make test-pyversions`` runs both, ``make test-py310`` and ``make test-py313``
one.

- ``FEDGE_PYVERSION``: ``3.10``, ``3.13`` or ``all`` (the default): which.
- ``FEDGE_PYVERSIONS_CACHE``: where the roots are, one directory per
  distribution (default ``~/.cache/fedge-pyversions``), and the logs.
- ``FEDGE_PYVERSIONS_PYTEST``: pytest's arguments inside instead of ``-x`` (the
  whole suite, stopping at the first failure), e.g. ``tests/unit -k codecs``
  or ``""`` for the whole suite without stopping.
- ``FEDGE_PYVERSIONS_TIMEOUT``: seconds the suite may take in one root
  (default 3600).
- ``FEDGE_TORCH_SPEC``: the PyTorch inside (default ``torch==2.13.0``).

The suite's output goes to ``suite.log`` beside the root. MNIST:
``$FEDGE_DATA``, when set, is bind-mounted read-only inside at
``/opt/fedge-data`` and is ``$FEDGE_DATA`` there; without it the tests that
need MNIST skip inside, as they do here.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root

pytestmark = pytest.mark.pyversions


@dataclass(frozen=True)
class Dist:
    name: str  # debootstrap's suite, and the cache directory
    python: str  # its python3
    what: str

    @property
    def cache(self) -> Path:
        base = os.environ.get("FEDGE_PYVERSIONS_CACHE") or str(Path.home() / ".cache" / "fedge-pyversions")
        return Path(base) / self.name

    @property
    def root(self) -> Path:
        return self.cache / "root"

    @property
    def log(self) -> Path:
        return self.cache / "suite.log"


DISTS = {
    "3.10": Dist("jammy", "3.10", "Ubuntu 22.04, a Jetson's JetPack 6"),
    "3.13": Dist("trixie", "3.13", "Debian trixie, Raspberry Pi OS's current release"),
}
SCRIPT = REPO / "tests" / "pyversions" / "rootfs.sh"
INSIDE = "/work/main"  # the copy
DATA_INSIDE = "/opt/fedge-data"  # the MNIST directory, read-only
PYTHON = "/opt/venv/bin/python"
# Passed on from this environment when set: OpenBLAS's CPU type on these
# machines (older builds crash or compute wrong results without it), CI.
PASSED_ON = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CI")


def _chosen() -> list[str]:
    which = os.environ.get("FEDGE_PYVERSION", "all").strip() or "all"
    chosen = list(DISTS) if which == "all" else [v.strip() for v in which.split(",")]
    if any(v not in DISTS for v in chosen):
        pytest.fail(f"FEDGE_PYVERSION={which}: choose {', '.join(DISTS)} or all", pytrace=False)
    return chosen


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
        env["FEDGE_DATA"] = DATA_INSIDE
    env.update({k: os.environ[k] for k in PASSED_ON if k in os.environ})
    return env


def _in_root(root: Path) -> list[int]:
    """Processes whose root directory is ``root``: what ran inside and is left."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "root") == str(root):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _kill_leftovers(root: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _in_root(root)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and _in_root(root):
            time.sleep(0.2)


def run_inside(dist: Dist, *cmd: str, timeout: float, log: Path | None = None) -> tuple[int, str]:
    """``cmd`` in the root under chroot from the copy's directory, in its own
    process group: killed with everything it started when it overruns."""
    out_path = log or dist.cache / "last-command.log"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out:
        proc = subprocess.Popen(["chroot", str(dist.root), "sh", "-c", 'cd "$0" && exec "$@"', INSIDE, *cmd],
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -1
    _kill_leftovers(dist.root)
    text = out_path.read_text(errors="replace")
    if code == -1:
        text += f"\n[test_pyversions] {' '.join(cmd)}: killed after {timeout:.0f} s\n"
        out_path.write_text(text)
    return code, text


@pytest.fixture(scope="module", params=list(DISTS), ids=[f"py{v.replace('.', '')}-{d.name}" for v, d in DISTS.items()])
def dist(request):
    version = request.param
    if version not in _chosen():
        pytest.skip(f"FEDGE_PYVERSION={os.environ.get('FEDGE_PYVERSION')}: not Python {version}")
    require_root("make test-pyversions (debootstrap, chroot, mount)")
    d = DISTS[version]
    data = _data()
    started = time.monotonic()
    try:
        build = subprocess.run(["bash", str(SCRIPT), d.name, str(d.root), str(REPO), *([str(data)] if data else [])],
                               capture_output=True, text=True, timeout=3600)
        assert build.returncode == 0, f"rootfs.sh failed:\n{build.stdout[-1500:]}\n{build.stderr[-1500:]}"
        print(f"\n{build.stdout.strip().splitlines()[-1]} (ready in {time.monotonic() - started:.0f} s)")
        yield d
    finally:
        _kill_leftovers(d.root)
        subprocess.run(["bash", str(SCRIPT), d.name, str(d.root), "--umount"], check=False, timeout=120)


def test_the_root_has_its_python(dist):
    code, out = run_inside(dist, PYTHON, "-c",
                           f"import sys; print(sys.version_info[:2] == {tuple(map(int, dist.python.split('.')))}, "
                           "sys.version)", timeout=120)
    assert code == 0 and out.startswith("True"), out


def test_lint_passes(dist):
    """``make lint`` inside: ruff, and mypy with the packages this Python resolves."""
    code, out = run_inside(dist, "sh", "-c", "ruff check . && mypy fedge fedge_cli aggregator edge_agent export",
                           timeout=1200)
    assert code == 0, out[-5000:]


def test_the_suite_passes(dist):
    extra = os.environ.get("FEDGE_PYVERSIONS_PYTEST")
    args = shlex.split(extra) if extra is not None else ["-x"]
    timeout = float(os.environ.get("FEDGE_PYVERSIONS_TIMEOUT", "3600"))
    started = time.monotonic()
    code, out = run_inside(dist, PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, timeout=timeout,
                           log=dist.log)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    print(f"\nPython {dist.python} ({dist.name}): {summary} ({time.monotonic() - started:.0f} s; output in {dist.log})")
    assert code == 0, out[-8000:]
