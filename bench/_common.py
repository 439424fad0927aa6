"""What every benchmark needs: the machine it ran on, a private Mosquitto, and
JSON output. Benchmarks print JSON on stdout (and to --out when given)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def note(message: str) -> None:
    """A line of progress on stderr when it is a terminal; nothing in a log or CI
    (the results are the JSON)."""
    from fedge.progress import interactive

    if interactive():
        print(message, file=sys.stderr, flush=True)


def progress(label: str, total: int | None = None, unit: str = "") -> Any:
    """A ``fedge.progress.Progress`` line on stderr, silent when it is not a terminal."""
    from fedge.progress import Progress

    return Progress(label, total, unit=unit)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"arch": platform.machine(), "python": platform.python_version(),
                            "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                            if line.startswith("model name")), None)
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["vnni"] = any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["ram_gb"] = round(int(mem.split()[1]) / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("fedge", "torch", "numpy", "paho-mqtt", "onnxruntime", "amqtt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    mosq = shutil.which("mosquitto")
    if mosq:
        out = subprocess.run([mosq, "-h"], capture_output=True, text=True).stdout.splitlines()
        versions["mosquitto"] = out[0].split()[-1] if out else "?"
    info["versions"] = versions
    return info


def emit(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateMosquitto:
    """A Mosquitto of the benchmark's own on a free loopback port."""

    def __init__(self, extra: str = "") -> None:
        if shutil.which("mosquitto") is None:
            raise SystemExit("this benchmark needs mosquitto (apt-get install mosquitto)")
        self.dir = Path(tempfile.mkdtemp(prefix="fedge-bench-mqtt-"))
        self.port = free_port()
        conf = self.dir / "m.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            + "max_queued_messages 100000\nmax_queued_bytes 0\n" + extra
        )
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# What a fleet needs of NATS's MQTT gateway (docs/how-to/nats-emqx.md): each
# QoS 1 subscription is a JetStream consumer, replicated like its stream (3
# nodes: a Raft group each) unless told otherwise; a fleet subscribes several
# a device and creates them in a burst at start.
MQTT_FLEET_SETTINGS = "  consumer_replicas: 1\n  consumer_memory_storage: true\n"


class NatsCluster:
    """A NATS JetStream cluster of ``nodes`` servers on loopback, each with
    its MQTT gateway on a free port (``urls``), like ``PrivateMosquitto``."""

    def __init__(self, nodes: int = 3, keep: Path | None = None, mqtt: str = MQTT_FLEET_SETTINGS) -> None:
        """``mqtt``: lines of each node's ``mqtt`` block (default: a fleet's,
        one in-memory replica a consumer; "" for NATS's defaults, which keep
        a session's consumers on three nodes and so outlive one)."""
        if shutil.which("nats-server") is None:
            raise SystemExit("this benchmark needs nats-server (apt-get install nats-server)")
        self.keep = keep is not None  # the directory (configurations, logs, JetStream stores) stays
        if keep is not None:
            keep.mkdir(parents=True)
        self.dir = keep if keep is not None else Path(tempfile.mkdtemp(prefix="fedge-bench-nats-"))
        client, cluster, mqtt_ports = ([free_port() for _ in range(nodes)] for _ in range(3))
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster)
        self.mqtt_ports = mqtt_ports
        self.procs = []
        for i in range(nodes):
            conf = self.dir / f"n{i}.conf"
            conf.write_text(
                f'server_name: "n{i}"\nlisten: "127.0.0.1:{client[i]}"\n'
                f'jetstream {{ store_dir: "{self.dir / f"js{i}"}" }}\n'
                f'cluster {{ name: "fedge", listen: "127.0.0.1:{cluster[i]}", routes: [{routes}] }}\n'
                f'mqtt {{ listen: "127.0.0.1:{mqtt_ports[i]}"\n{mqtt}}}\n'
                "max_payload: 4MB\n")
            log = (self.dir / f"n{i}.log").open("wb")
            self.procs.append(subprocess.Popen(["nats-server", "-c", str(conf)], stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        for port in mqtt_ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

        self._wait_ready(deadline + 60)

    def _wait_ready(self, deadline: float) -> None:
        """Until a retained QoS 1 message published on the first node reaches
        a subscriber on the last (JetStream elects its stream leaders some
        seconds after the ports open)."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        got: list[bytes] = []
        while time.monotonic() < deadline:
            pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-ready-pub")
            sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-ready-sub")
            sub.on_message = lambda c, u, m: got.append(m.payload)
            try:
                pub.connect("127.0.0.1", self.mqtt_ports[0])
                pub.loop_start()
                pub.publish("bench/ready", b"1", qos=1, retain=True).wait_for_publish(5)
                sub.connect("127.0.0.1", self.mqtt_ports[-1])
                sub.subscribe("bench/ready", qos=1)
                sub.loop_start()
                end = time.monotonic() + 5
                while not got and time.monotonic() < end:
                    time.sleep(0.1)
            except (OSError, RuntimeError, ValueError):
                pass
            finally:
                for c in (pub, sub):
                    c.loop_stop()
                    c.disconnect()
            if got:
                return
            time.sleep(1)
        raise SystemExit("the NATS cluster did not carry a retained message from one node to another in time")

    @property
    def urls(self) -> list[str]:
        return [f"mqtt://127.0.0.1:{p}" for p in self.mqtt_ports]

    def kill(self, node: int) -> None:
        """SIGKILL one node (its MQTT clients lose their connection)."""
        self.procs[node].kill()
        self.procs[node].wait(10)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
