"""``fedge status`` against a real Mosquitto: the fleet of a job that ran,
from the broker's retained messages, with a device that left and a forged
record that must be left out."""

from __future__ import annotations

import json
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import AggregatorConfig
from aggregator.fleet import FILE
from aggregator.registry import Registry
from fedge.config import render_defaults
from fedge.messages import DeviceRecord
from fedge.topics import JobTopics
from tests.conftest import fedge_cmd

from .support import devices, job_config, running_aggregator, running_fleet

pytestmark = pytest.mark.integration


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="forger")
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def test_status_shows_each_device_its_hardware_rounds_and_receipts(mosquitto, tmp_path, cli_env):
    cfg = job_config(tmp_path, mosquitto.url, rounds=2, agents=3)
    specs = devices(tmp_path, "itest", 3)
    with running_aggregator(cfg) as (service, records), running_fleet(specs[:2], cfg.broker) as staying:
        with running_fleet(specs[2:], cfg.broker):
            assert service.done.wait(90), f"job did not finish: {records}"
        # dev-2 has left (its fleet closed: presence offline); the others stay.
        conf = tmp_path / "job.toml"
        conf.write_text(render_defaults(AggregatorConfig, cfg))
        # A forged record (unsigned) for a device that does not exist, and an unreadable one.
        forged = DeviceRecord("itest", "dev-9", True, time.time(), 99, "accepted", 2, {"role": "trainer"}).encode()
        publish_retained(mosquitto.port, JobTopics("itest").device("dev-9"), forged)
        publish_retained(mosquitto.port, JobTopics("itest").device("dev-8"), b"garbage")
        proc = subprocess.run(fedge_cmd("status", "--config", str(conf), "--json", "--wait", "10"), env=cli_env,
                              capture_output=True, text=True, timeout=60)
        assert staying.connected == {"dev-0", "dev-1"}
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    # The job is done, and its aggregator still serves its final state until stopped (job.linger_s).
    assert view["aggregator"] == "online"
    assert view["round"] == {"state": "done", "round": 3, "attempt": view["round"]["attempt"], "mode": "synchronous",
                             "max_staleness": None}
    assert sorted(view["devices"]) == ["dev-0", "dev-1", "dev-2"]
    assert view["skipped"] == 2 and view["unverified"] == 0
    for name, d in view["devices"].items():
        assert d["online"] is (name != "dev-2"), d
        assert d["role"] == "trainer" and d["fedge"] == "0.1.0" and d["arch"] and d["ram_mb"] > 0 and d["cpus"] >= 1
        assert "int2" in d["codecs"]
        assert d["rounds"] == sum(1 for r in records if name in r["accepted"]) == 2
        # Counted either way: a device whose receipt was slow resends, and the copy is "duplicate".
        assert d["last_receipt"] in ("accepted", "duplicate") and d["last_round"] == 2
    left = view["devices"]["dev-2"]
    assert left["last_seen"] is not None and view["time"] - 120 < left["last_seen"] <= view["time"]
    # The aggregator keeps what it knows across restarts, beside (never over) its device registry.
    saved = json.loads((tmp_path / "aggregator" / FILE).read_text())
    assert saved["devices"]["dev-0"]["rounds"] == 2
    registry = Registry(tmp_path / "aggregator")
    registry.reload()
    assert sorted(d.id for d in registry.active()) == ["dev-0", "dev-1", "dev-2"]

    table = subprocess.run(fedge_cmd("status", "--config", str(conf), "--wait", "5"), env=cli_env,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    # Stopped, the fleets closed too; the retained announcement says how the job ended.
    assert lines[0].startswith("job itest: aggregator offline, job done, 0/3 devices online")
    assert lines[1].split()[:3] == ["device", "role", "state"]
    assert any(line.startswith("dev-2") and "offline" in line and
               ("accepted (round 2)" in line or "duplicate (round 2)" in line) for line in lines)
    assert "left out 2 message(s)" in table.stdout


def test_status_without_a_broker_is_one_line(tmp_path, cli_env):
    conf = tmp_path / "job.toml"
    conf.write_text('[broker]\nurl = "mqtt://127.0.0.1:9"\n')
    proc = subprocess.run(fedge_cmd("status", "--config", str(conf), "--wait", "2"), env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the broker at mqtt://127.0.0.1:9: connection refused" in lines[0], \
        proc.stderr
