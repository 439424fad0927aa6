"""Shared fixtures: a real Mosquitto per test, on a free loopback port, with
its own config (limits, ACLs, TLS), which a test may restart or kill; a real
nats-server (JetStream and its MQTT gateway) the same way."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mnist_file() -> Path:
    """The MNIST file the tests read: ``$FEDGE_DATA/mnist.npz`` (``.ci/run``
    sets FEDGE_DATA). Skips the calling test, saying how to give the file,
    when FEDGE_DATA is not set or holds no mnist.npz."""
    data = os.environ.get("FEDGE_DATA")
    if not data:
        pytest.skip("MNIST: set FEDGE_DATA to the directory that holds mnist.npz (`fedge data fetch mnist` "
                    "downloads it)")
    path = Path(data).expanduser() / "mnist.npz"
    if not path.is_file():
        pytest.skip(f"MNIST file {path} not found: set FEDGE_DATA to the directory that holds mnist.npz")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def await_port(proc: subprocess.Popen, port: int, timeout: float, what: str, log: Path) -> None:
    """Until ``proc`` accepts connections on ``port``; RuntimeError (with its
    log) when it exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text() if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open its port")


def terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mosquitto:
    def __init__(self, workdir: Path, extra: str = "", port: int | None = None, tls: bool = False,
                 persistence: bool = True) -> None:
        self.workdir = workdir
        self.persistence = persistence
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Started as root, mosquitto would drop to its own user, which
            # cannot read the test's private temporary directory.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"persistence {'true' if self.persistence else 'false'}\npersistence_location {self.workdir}/\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 20000\n"
            + (self.extra if "allow_anonymous" in self.extra else "allow_anonymous true\n" + self.extra)
        )
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        await_port(self.proc, self.port, 10, "mosquitto", self.log)
        return self

    def stop(self) -> None:
        terminate(self.proc, 5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto_factory(tmp_path):
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto mosquitto-clients")
    brokers: list[Mosquitto] = []

    def make(extra: str = "", tls: bool = False, name: str = "broker", persistence: bool = True) -> Mosquitto:
        b = Mosquitto(tmp_path / name, extra=extra, tls=tls, persistence=persistence)
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        b.kill()


@pytest.fixture
def mosquitto(mosquitto_factory):
    return mosquitto_factory()


class Nats:
    """One nats-server with JetStream and its MQTT gateway on free loopback
    ports; ``extra`` goes into its configuration (``authorization``, ...),
    ``mqtt`` into its ``mqtt`` block."""

    def __init__(self, workdir: Path, extra: str = "", mqtt: str = "") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.mqtt_port = free_port(), free_port()
        self.conf = workdir / "nats.conf"
        self.log = workdir / "nats.log"
        self.proc: subprocess.Popen | None = None
        self.mqtt = mqtt  # lines of its ``mqtt`` block
        self.write(extra)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def write(self, extra: str) -> None:
        self.conf.write_text(
            f'server_name: "fedge-test"\nlisten: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}\n'
            f'mqtt {{ listen: "127.0.0.1:{self.mqtt_port}"\n{self.mqtt}\n}}\n{extra}')

    def start(self) -> Nats:
        with self.log.open("ab") as log:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(["nats-server", "-c", str(self.conf)], stdout=log, stderr=log)
        await_port(self.proc, self.mqtt_port, 20, "nats-server", self.log)
        return self

    def stop(self) -> None:
        terminate(self.proc, 10)


@pytest.fixture
def nats_factory(tmp_path):
    if shutil.which("nats-server") is None:
        pytest.fail("nats-server is not installed: apt-get install nats-server")
    servers: list[Nats] = []

    def make(extra: str = "", name: str = "nats", mqtt: str = "") -> Nats:
        n = Nats(tmp_path / name, extra, mqtt)
        servers.append(n)
        return n.start()

    yield make
    for n in servers:
        n.stop()


def fedge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedge_cli", *args]


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Suites that run only when asked for: marker -> (environment switch, make target).
OPT_IN = {
    "arm64": ("FEDGE_ARM64", "make test-arm64"),
    "systemd": ("FEDGE_SYSTEMD", "make test-systemd"),
    "pyversions": ("FEDGE_PYVERSIONS", "make test-pyversions"),
}


def pytest_collection_modifyitems(config, items):
    """``make test`` leaves out the opt-in suites (root, a root file system,
    tens of minutes); their make targets set the switch that runs them."""
    for marker, (switch, target) in OPT_IN.items():
        if os.environ.get(switch) == "1":
            continue
        skip = pytest.mark.skip(reason=f"opt-in suite: run {target}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def require_root(what: str) -> None:
    """An opt-in suite that was asked for fails, not skips, without root."""
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root: run it as root (sudo make ...)", pytrace=False)
