"""The service units under a real systemd: a Debian bookworm root booted with
``systemd-nspawn`` (systemd as its PID 1), ``deploy/install.sh aggregator``
and ``deploy/install.sh agent`` run in it as an operator runs them (units
written and enabled, the device enrolled with ``fedge enroll``), and both
services, started by systemd at boot inside every sandbox their units ask
for, run a job together over a Mosquitto on this host.

Not part of ``make test``: it needs root and ``systemd-nspawn``
(systemd-container) and builds a root file system (a minute or two, cached in
``~/.cache/fedge-systemd``). ``make test-systemd`` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, mnist_file, require_root

from ..integration.support import wait_for
from .nspawn import PATH, Booted, exposure, seccomp_filters, status_of

pytestmark = pytest.mark.systemd
ROOT = Path(os.environ.get("FEDGE_SYSTEMD_ROOT", str(Path.home() / ".cache" / "fedge-systemd" / "root")))
REPORT = Path(os.environ.get("FEDGE_SYSTEMD_REPORT", str(REPO / "bench" / "results" / "systemd.json")))


def _run(cmd: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def chroot(*cmd: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return _run(["chroot", str(ROOT), *cmd], timeout=timeout, check=check, env=env)


@pytest.fixture(scope="module")
def root():
    require_root("make test-systemd (debootstrap, chroot, systemd-nspawn)")
    missing = [pkg for cmd, pkg in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"))
               if shutil.which(cmd) is None]
    if missing:  # Debian's packages, as rootfs.sh installs debootstrap for make test-arm64
        _run(["apt-get", "update", "-qq"], timeout=600)
        _run(["apt-get", "install", "-y", "-qq", *missing], timeout=1200,
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not (ROOT / ".fedge-rootfs").exists():
        subprocess.run(["rm", "-rf", str(ROOT)], check=True)
        ROOT.mkdir(parents=True)
        _run(["debootstrap", "--variant=minbase",
              "--include=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps",
              "bookworm", str(ROOT), os.environ.get("FEDGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")],
             timeout=1800)
        (ROOT / ".fedge-rootfs").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", ROOT / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    shutil.copy("/etc/resolv.conf", ROOT / "etc" / "resolv.conf")
    return ROOT


@pytest.fixture(scope="module")
def installed(root):
    """A clone's tracked files, then ``install.sh aggregator`` and ``install.sh
    agent`` with their units. PyTorch from the wheel this machine's pip would
    pick (PyPI's default torch for x86 pulls CUDA); the rest from the registry."""
    stale = [root / "opt", root / "etc" / "fedge", root / "var" / "lib" / "fedge-agent",
             root / "var" / "lib" / "fedge-aggregator", root / "var" / "lib" / "fedge-data",
             *(root / "etc" / "systemd" / "system").glob("fedge-*.service"),
             *(root / "etc" / "systemd" / "system" / "multi-user.target.wants").glob("fedge-*.service")]
    subprocess.run(["rm", "-rf", *map(str, stale)], check=True)
    src = root / "opt" / "src" / "fedge"
    src.mkdir(parents=True)
    files = _run(["git", "ls-files", "-z"], cwd=REPO).stdout
    tar = subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=REPO, input=files.encode(), capture_output=True,
                         check=True).stdout
    subprocess.run(["tar", "-xf", "-", "-C", str(src)], input=tar, check=True)
    torch = _torch_wheel()
    torch_spec = "torch==2.13.0"
    if torch is not None:
        (root / "opt" / "wheels").mkdir()
        shutil.copy(torch, root / "opt" / "wheels" / torch.name)
        torch_spec = f"/opt/wheels/{torch.name}"
    out: dict[str, Any] = {}
    for role in ("aggregator", "agent"):
        started = time.monotonic()
        proc = chroot("/opt/src/fedge/deploy/install.sh", role, "--torch", torch_spec, timeout=3600)
        out[f"{role}_install_seconds"] = round(time.monotonic() - started, 1)
        unit = f"fedge-{role}.service"
        assert f"{unit} is enabled and starts at boot (systemd is not running here)" in proc.stdout, proc.stdout
        assert (root / "etc" / "systemd" / "system" / "multi-user.target.wants" / unit).is_symlink()
        if role == "agent":
            out["device_key"] = next(line for line in proc.stdout.splitlines() if "fedge enroll" in line).split()[-1]
    return out


def _torch_wheel() -> Path | None:
    for d in [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]:
        found = sorted(Path(d).glob("torch-2.*+cpu-*x86_64.whl")) if Path(d).is_dir() else []
        if found:
            return found[-1]
    return None


def test_both_units_run_a_job_under_their_sandboxes(installed, mosquitto, tmp_path):
    device, fedge = "box-systemd", "/opt/fedge/venv/bin/fedge"
    data = ROOT / "var" / "lib" / "fedge-data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(mnist_file(), data / "mnist.npz")
    # The operator's steps: the aggregator's key made and pinned on the
    # device, the job and the device's config edited, the device enrolled.
    aggregator_key = chroot(fedge, "keys", "new", "--out", "/etc/fedge/aggregator.key").stdout.split()[0]
    chroot("chown", "fedge:fedge", "/etc/fedge/aggregator.key")
    mnist = 'data = "fedge.datasets:mnist"\nargs = { path = "/var/lib/fedge-data/mnist.npz", '
    (ROOT / "etc" / "fedge" / "job.toml").write_text(
        '[job]\nname = "sd"\nmodel = "fedge.models:mnist_2nn"\nrounds = 3\nstate_dir = "/var/lib/fedge-aggregator/sd"\n'
        '[selection]\nmin_clients = 1\ndeadline_s = 600\n'
        '[training]\nepochs = 2\nbatch_size = 16\nlr = 0.1\n'
        f'[evaluate]\n{mnist}split = "test", limit = 2000 }}\n'
        '[identity]\nkey_file = "/etc/fedge/aggregator.key"\n'
        f'[broker]\nurl = "{mosquitto.url}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n')
    (ROOT / "etc" / "fedge" / "agent.toml").write_text(
        f'[agent]\nid = "{device}"\njob = "sd"\nstate_dir = "/var/lib/fedge-agent"\n'
        '[data]\nfactory = "fedge.datasets:mnist"\n'
        'args = { path = "/var/lib/fedge-data/mnist.npz", client = 0, clients = 2, partition = "iid", limit = 2000 }\n'
        '[identity]\nkey_file = "/etc/fedge/device.key"\n'
        f'aggregator_key = "{aggregator_key}"\n'
        '[worker]\nmode = "per_round"\n'
        f'[broker]\nurl = "{mosquitto.url}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n')
    chroot(fedge, "enroll", "--config", "/etc/fedge/job.toml", device, installed["device_key"])
    rounds = ROOT / "var" / "lib" / "fedge-aggregator" / "sd" / "rounds.jsonl"
    measured: dict[str, Any] = {k: v for k, v in installed.items() if k.endswith("_seconds")}
    booted = Booted(ROOT, tmp_path / "nspawn.log")
    try:
        def journal(unit: str) -> str:
            return booted.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout[-3000:]

        def records() -> list[dict]:
            return [json.loads(line) for line in rounds.read_text().splitlines()] if rounds.exists() else []

        # Both enabled by install.sh, so systemd started them at boot.
        for unit in ("fedge-aggregator", "fedge-agent"):
            wait_for(lambda u=unit: booted.run("systemctl", "is-active", u, check=False).stdout.strip() == "active",
                     60, f"{unit}.service active")
        agent_pid = int(booted.run("systemctl", "show", "-P", "MainPID", "fedge-agent").stdout)
        aggregator_pid = int(booted.run("systemctl", "show", "-P", "MainPID", "fedge-aggregator").stdout)
        sandboxes = {"fedge-agent": status_of(booted, agent_pid), "fedge-aggregator": status_of(booted, aggregator_pid)}
        filters = {"fedge-agent": seccomp_filters(booted, agent_pid),
                   "fedge-aggregator": seccomp_filters(booted, aggregator_pid)}
        try:
            wait_for(lambda: len(records()) >= 3, 900, "three rounds")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {records()}\n{journal('fedge-aggregator')}\n{journal('fedge-agent')}"
                                 ) from None
        done = records()
        assert all(r["status"] == "ok" and device in r["accepted"] for r in done), (done, journal("fedge-agent"))
        assert done[-1]["accuracy"] > 0.5, done
        for unit, status in sandboxes.items():
            # What the kernel says each sandbox is: no capabilities, no new
            # privileges, the unit's seccomp filters (architectures, address
            # families) on top of those nspawn puts on the whole container.
            assert status["CapBnd"] == "0000000000000000" and status["CapEff"] == "0000000000000000", (unit, status)
            assert status["NoNewPrivs"] == "1", (unit, status)
            assert filters[unit][0] > filters[unit][1], (unit, filters[unit])  # the unit's own, beyond nspawn's
            assert status["Uid"].split()[0] == booted.run("id", "-u", "fedge").stdout.strip(), (unit, status)
            restarts = booted.run("systemctl", "show", "-P", "NRestarts", unit).stdout.strip()
            assert restarts == "0", journal(unit)
            analysis = booted.run("systemd-analyze", "security", unit, check=False).stdout.strip().splitlines()
            measured[unit] = {"process": {k: status[k] for k in ("CapBnd", "NoNewPrivs")},
                              "seccomp_filters": {"service": filters[unit][0], "container_init": filters[unit][1]},
                              "restarts": int(restarts), "exposure": exposure(analysis)}
        assert "libtorch" not in booted.run("cat", f"/proc/{agent_pid}/maps").stdout, "no PyTorch in the idle agent"
        measured.update({"rounds": len(done), "round_seconds": [r["seconds"] for r in done],
                         "accuracy": done[-1]["accuracy"],
                         "systemd": booted.run("systemctl", "--version").stdout.splitlines()[0]})
    finally:
        booted.stop()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"benchmark": "service units under systemd (x86_64, systemd-nspawn)",
                                  "measured": measured}, indent=2) + "\n")
