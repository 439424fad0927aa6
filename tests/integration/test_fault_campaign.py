"""The independent fault campaign's cases, replayed against a real Mosquitto
(without ACL, so the attacker can publish anywhere), a real aggregator and
real training agents. Each case once broke the job; now the job must finish
every round, with a finite, useful model and every attack counted.

1. a presence whose ``info`` is not an object (crashed the aggregator);
2. a finite but huge update (scale 3e38) with 10^6 samples (crashed it at
   round close);
3. an update with 10^6 samples and scale 10 (poisoned the model);
4. a flood of first chunks each claiming 16 MiB (blocked real updates);
5. invented "online" devices and a forged "offline" for a real one (rounds
   ran to their deadline; the job waited for good);
7. a string ``train_seconds`` in an update header (uncounted, no receipt);
8. an announcement for round 10^9 with the real model digest (stopped every
   agent for good).

Case 6 (the broker's packet limit) is tests/integration/test_packet_limit.py.
"""

import dataclasses
import threading

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge import chunks, wire
from fedge.chunks import CHUNK_HEADER, CHUNK_MAGIC
from fedge.codecs import make_codec
from fedge.config import updated
from fedge.messages import RoundAnnouncement, Status, Update
from fedge.topics import JobTopics

from .support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration

JOB = "campaign"
TOPICS = JobTopics(JOB)


class Attacker:
    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="attacker")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def update(self, core, sender: str, delta: dict, samples: int, update_id: str) -> None:
        msg = Update(job=JOB, round=core.next_round, sender=sender, update_id=update_id, num_samples=samples,
                     codec=core.codec_params, base_model=core.model_digest,
                     body=make_codec(core.codec_params).encode(delta, np.random.default_rng(1))).encode()
        for part in chunks.split(msg, 100_000):
            self.publish(TOPICS.update(sender), part)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_the_fault_campaign_cannot_crash_stall_or_poison_the_job(mosquitto, tmp_path):
    # Unsigned (identity.signing = "off"): the hardening must hold without
    # signatures; signed, these forgeries are refused first (test_forgery.py).
    cfg = updated(job_config(tmp_path, mosquitto.url, job=JOB, rounds=7, agents=3),
                  selection={"deadline_s": 20.0, "settle_s": 1.0}, identity={"signing": "off"})
    attacker = Attacker(mosquitto.port)
    fleet_specs = devices(tmp_path, JOB, 3, signed=False)
    with running_aggregator(cfg) as (service, records), running_fleet(fleet_specs, cfg.broker) as fleet:
        wait_for(lambda: len(records) >= 1, 120, "round 1")
        core = service.core
        spec = dict(core.spec.entries)

        # 1. a presence whose info is a string, retained
        attacker.publish(TOPICS.status("evil"), Status("evil", "online", "boom").encode(), retain=True)  # type: ignore[arg-type]
        # 2. a registered device's update, huge but finite, with 10^6 samples
        attacker.update(core, "dev-1", {k: np.full(s, 3e38, np.float32) for k, s in spec.items()}, 10**6, "huge")
        # 3. in the next round, another's: 10^6 samples, scaled x10 (one attacker per round, as in the campaign)
        wait_for(lambda: len(records) >= 2, 120, "round 2")
        rng = np.random.default_rng(0)
        attacker.update(core, "dev-0", {k: (rng.normal(size=s) * 10).astype(np.float32) for k, s in spec.items()},
                        10**6, "heavy")
        # 4. sixteen first chunks, each claiming a 16 MiB message
        for i in range(16):
            head = CHUNK_HEADER.pack(CHUNK_MAGIC, 1, 0, bytes([i]) * 16, 0, 16 * 64, 16 << 20)
            attacker.publish(TOPICS.update(f"flood-{i}"), head + b"\0" * 1024)
        # 7. a string train_seconds in a header that names its round and update id
        header = {"job": JOB, "round": core.next_round, "sender": "dev-2", "update_id": "typed", "num_samples": 5,
                  "codec": core.codec_params, "base_model": core.model_digest, "train_seconds": "slow"}
        attacker.publish(TOPICS.update("dev-2"), chunks.split(wire.encode(wire.Kind.UPDATE, header, b""), 10_000)[0])
        # 8. an announcement for round 10^9 with the real digest
        real = RoundAnnouncement.parse(wire.decode(mosquitto_retained(mosquitto.port, TOPICS.round)))
        attacker.publish(TOPICS.round, dataclasses.replace(real, round=10**9).encode(), retain=True)
        # 5. two invented devices online, and a forged offline for a real one
        for ghost in ("ghost-1", "ghost-2"):
            attacker.publish(TOPICS.status(ghost), Status(ghost, "online", {}).encode(), retain=True)
        attacker.publish(TOPICS.status("dev-2"), Status("dev-2", "offline").encode(), retain=True)

        assert service.done.wait(240), f"the job did not finish: {[r['status'] for r in records]}"
        counters = dict(core.counters)
        exact = {k: v.copy() for k, v in core.models.exact.items()}
    attacker.stop()
    # Unsigned, the forged round 10^9 can cost one round (the agents train it
    # and their updates are refused as future_round), never the job.
    failed = [r for r in records if r["status"] != "ok"]
    assert len(records) == 7 and len(failed) <= 1, [(r["status"], r.get("rejected")) for r in records]
    assert all(set(r["rejected"]) <= {"future_round"} for r in failed), failed
    assert all(np.isfinite(v).all() for v in exact.values())
    assert records[-1]["accuracy"] >= 0.85, [r.get("accuracy") for r in records]
    # every real device trained in the last round, after the forged round 10^9
    assert set(records[-1]["accepted"]) == {"dev-0", "dev-1", "dev-2"}, records[-1]
    assert counters.get("bad_status", 0) >= 1
    assert counters.get("chunk_not_selected", 0) == 16
    assert counters.get("malformed", 0) >= 1
    assert counters.get("unresponsive", 0) >= 1  # the ghosts, once
    assert counters.get("internal_error", 0) == 0
    assert fleet.presence_repairs >= 1


def mosquitto_retained(port: int, topic: str, timeout: float = 5.0) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="reader")

    def on_message(c, u, msg):
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        assert done.wait(timeout), f"nothing retained on {topic}"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]
