"""Running real aggregators and fleets against a test broker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.pool import TrainingPool
from edge_agent.runtime import AgentRuntime, DeviceSpec
from fedge.config import BrokerSettings, updated
from fedge_cli.identity import provision


def broker_settings(url: str, **kw: Any) -> BrokerSettings:
    return BrokerSettings(url=url, reconnect_min_s=1, reconnect_max_s=2, keepalive_s=5, **kw)


def job_config(tmp: Path, url: str, *, job: str = "itest", rounds: int = 3, agents: int = 3, **broker: Any
               ) -> AggregatorConfig:
    return updated(
        AggregatorConfig(),
        job={"name": job, "rounds": rounds, "state_dir": str(tmp / "aggregator")},
        selection={"min_clients": agents, "deadline_s": 30.0},
        training={"epochs": 2, "batch_size": 16, "lr": 0.1},
        evaluate={"data": "fedge.datasets:digits", "args": {"split": "test"}},
        broker=broker_settings(url, **broker),
    )


def devices(tmp: Path, job: str, n: int, prefix: str = "dev", data: str = "fedge.datasets:digits",
            signed: bool = True, **extra: Any) -> list[DeviceSpec]:
    """``n`` devices; ``signed``: each with its own key, enrolled with the
    aggregator whose state is in ``tmp / "aggregator"`` (``job_config``'s),
    pinning that aggregator's key (made now if it has none yet)."""
    ids = [f"{prefix}-{i}" for i in range(n)]
    aggregator_key, keys = provision(tmp / "aggregator", ids, tmp / "keys") if signed else (None, {})
    return [
        DeviceSpec(client_id=cid, job=job, data=data,
                   data_args={"client": i, "clients": n, "partition": "dirichlet", "alpha": 0.5, **extra},
                   state_dir=tmp / "agents" / cid, resend_after_s=3.0,
                   identity=keys.get(cid), aggregator_key=aggregator_key)
        for i, cid in enumerate(ids)
    ]


def identity_toml(tmp: Path, device_id: str) -> str:
    """The ``[identity]`` section of an agent config file for ``device_id``:
    its own key (made and enrolled with the aggregator whose state is in
    ``tmp / "aggregator"``) and that aggregator's key, pinned."""
    aggregator_key, _ = provision(tmp / "aggregator", [device_id], tmp / "keys")
    return (f'[identity]\nkey_file = "{tmp / "keys" / f"{device_id}.key"}"\n'
            f'aggregator_key = "{aggregator_key.to_text()}"\n')


@contextmanager
def running_fleet(specs: list[DeviceSpec], settings: BrokerSettings, workers: int = 2,
                  pool: TrainingPool | None = None, metrics: Any = None) -> Iterator[AgentRuntime]:
    """Devices in one runtime; ``pool`` shares another fleet's warm workers
    (devices that join later then train at once instead of starting PyTorch)."""
    own = pool is None
    pool = pool or TrainingPool(size=workers, mode="warm", threads=1)
    fleet = AgentRuntime(specs, settings, pool, tick_s=0.2, metrics=metrics)
    fleet.start()
    t = threading.Thread(target=fleet.run, daemon=True)
    t.start()
    try:
        yield fleet
    finally:
        fleet.stop()
        t.join(10)
        fleet.close()
        if own:
            pool.close()


@contextmanager
def running_aggregator(cfg: AggregatorConfig) -> Iterator[tuple[AggregatorService, list[dict]]]:
    records: list[dict] = []
    service = AggregatorService(cfg, on_record=records.append)
    t = threading.Thread(target=service.run, daemon=True)
    t.start()
    try:
        yield service, records
    finally:
        service.stop()
        t.join(15)


def read_log(state_dir: Path) -> list[dict]:
    path = state_dir / "rounds.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_online(port: int, job: str, clients: list[str], timeout: float = 60) -> None:
    """Block until every client's retained presence says online."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from fedge import wire
    from fedge.messages import Status
    from fedge.topics import JobTopics

    seen: dict[str, str] = {}

    def on_message(client, userdata, msg):
        if msg.payload:
            status = Status.parse(wire.decode(msg.payload))
            seen[status.sender] = status.state

    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(JobTopics(job).status_filter, qos=1)
    c.loop_start()
    try:
        wait_for(lambda: all(seen.get(x) == "online" for x in clients), timeout, f"{clients} online")
    finally:
        c.loop_stop()
        c.disconnect()
