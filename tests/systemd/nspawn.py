"""A root file system booted under systemd-nspawn, systemd as its PID 1,
sharing this host's network (services inside reach the host's Mosquitto on
loopback). Used by ``make test-systemd`` (x86_64, native) and ``make
test-arm64`` (arm64's systemd under qemu-user)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..integration.support import wait_for

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(cmd: list[str], timeout: float, check: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


class Booted:
    """``root`` booted; ``run`` runs a command inside, in all its namespaces."""

    def __init__(self, root: Path, log: Path, boot_timeout: float = 120) -> None:
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--directory", str(root), "--boot",
             "--console=passive"], stdout=self._log, stderr=subprocess.STDOUT, env={"PATH": PATH})
        self.pid = 0
        wait_for(self._init, 60, "systemd as the container's PID 1")
        wait_for(self._up, boot_timeout, "the container's boot to finish")

    def _up(self) -> bool:
        # "degraded": booted, with some unit of the base system failed (none of ours is checked here).
        state = self.run("systemctl", "is-system-running", check=False, timeout=120).stdout.strip()
        return state in ("running", "degraded")

    def _init(self) -> bool:
        """The container's PID 1: nspawn's child that is PID 1 in its own
        namespace (while booting, nspawn's helper children come and go)."""
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == "1":
                self.pid = int(child)
                return True
        return False

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run(["nsenter", "-t", str(self.pid), "-a", "env", f"PATH={PATH}", *cmd], timeout=timeout,
                    check=check)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.run("systemctl", "poweroff", "--no-block", check=False)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def status_of(booted: Booted, pid: int) -> dict[str, str]:
    """/proc/PID/status inside the container, as a dict."""
    fields = {}
    for line in booted.run("cat", f"/proc/{pid}/status").stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def exposure(analysis: list[str]) -> float:
    """The overall figure of ``systemd-analyze security UNIT`` (0 best, 10 worst)."""
    return float(analysis[-1].split(":")[-1].split()[0])


def seccomp_filters(booted: Booted, pid: int) -> tuple[int, int]:
    """Seccomp filters on ``pid``, and on the container's PID 1 (systemd,
    which carries only the filters systemd-nspawn puts on every process in
    the container): more on ``pid`` means its unit's filters apply."""
    return (int(status_of(booted, pid)["Seccomp_filters"]), int(status_of(booted, 1)["Seccomp_filters"]))
