"""A whole job with real training, on the in-memory transport: the
aggregator's and the agents' shells together, no broker process. What only
a real broker shows (TLS, ACLs, packet limits, restarts) stays in
tests/integration."""

from __future__ import annotations

import threading
import time
from collections import Counter

from aggregator.service import AggregatorService
from edge_agent.pool import TrainingPool
from edge_agent.runtime import AgentRuntime, DeviceSpec
from fedge.config import updated
from fedge.transport import MemoryBroker

from .builders import SHELL_JOB as JOB
from .builders import TOPICS, devices, job, job_and_fleet, wait_for


def test_a_job_runs_over_the_memory_broker_through_redelivery_and_a_reconnect(tmp_path):
    broker = MemoryBroker(duplicates=True)  # every QoS 1 message twice: receipts and folds stay exactly-once
    cfg = updated(job(tmp_path, min_clients=2, deadline_s=60.0), job={"rounds": 3},
                  training={"epochs": 1, "batch_size": 32, "lr": 0.1})
    records = []
    with job_and_fleet(cfg, broker, devices(tmp_path, 2), TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, fleet):
        wait_for(lambda: len(records) >= 1, 120)
        # dev-0 loses its connection (its will says offline) and comes back: the broker kept its session.
        broker.crash("dev-0")
        fleet.devices["dev-0"].link.start()
        assert service.done.wait(180), records
    assert [r.status for r in records] == ["ok"] * 3 and all(r.clients == 2 for r in records)
    assert all(fleet.traffic[r.round][0] > 0 and fleet.traffic[r.round][1] > 0 for r in records), fleet.traffic
    assert (TOPICS.status("dev-0"), b"") not in [(t, p) for _, t, p, _ in broker.published]
    # Every update is folded once, though each arrived twice: second copies are refused as duplicates (or as
    # late, when the first closed the round; the job may end before the last one is read).
    assert service.core.counters["accepted"] == 6 and service.core.counters["duplicate"] >= 1


def test_a_reconnect_downloads_no_model_again(tmp_path):
    """After a lost connection, the link re-subscribes what the device
    subscribed, and the device asks for nothing more: the model it holds is
    not downloaded a second time. (The job waits for a second device, so no
    new model is published meanwhile.)"""
    broker = MemoryBroker()
    cfg = job(tmp_path, min_clients=2)
    spec = devices(tmp_path, 1)[0]
    follower = DeviceSpec(**{**spec.__dict__, "downlink": "follow"})

    def model_copies() -> int:
        return sum(1 for client, topic, _ in broker.delivered if client == "dev-0" and "/model/" in topic)

    def presence_published() -> int:
        return sum(1 for client, topic, _, _ in broker.published if client == "dev-0" and topic == TOPICS.status(
            "dev-0"))

    with job_and_fleet(cfg, broker, [follower], TrainingPool(size=1, mode="per_round")) as (_, fleet):
        wait_for(lambda: model_copies() >= 1 and presence_published() >= 1)
        time.sleep(0.5)  # let the device act on what it received
        before, presences = model_copies(), presence_published()
        broker.crash("dev-0")
        fleet.devices["dev-0"].link.start()
        wait_for(lambda: presence_published() > presences + 1)  # its will, then its own "online" again
        time.sleep(0.5)
    assert model_copies() == before


def test_a_forged_offline_cannot_hold_the_job(tmp_path):
    """Fault campaign case 5: on a broker without ACL, one retained "offline"
    for a real device left the job waiting for good. The device sees its own
    presence and publishes it again."""
    from fedge.messages import Status

    broker = MemoryBroker()
    cfg = updated(job(tmp_path, min_clients=2, deadline_s=60.0), job={"rounds": 3})
    records = []
    with job_and_fleet(cfg, broker, devices(tmp_path, 2), TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, fleet):
        wait_for(lambda: len(records) >= 1, 120)
        broker.publish("forger", TOPICS.status("dev-0"), Status("dev-0", "offline").encode(), retain=True)
        assert service.done.wait(60), records
    assert [r.status for r in records] == ["ok"] * 3
    assert fleet.presence_repairs >= 1


def test_a_signed_job_trains_and_its_devices_refuse_what_the_aggregator_did_not_sign(tmp_path):
    """identity.signing = "required" on both sides: the devices are enrolled,
    sign their presence and updates, and act only on what the aggregator
    signed; a forged announcement for round 10^9 and a forged receipt are
    refused and the job trains on."""
    import dataclasses

    from aggregator.registry import Registry
    from fedge import wire
    from fedge.identity import Identity
    from fedge.messages import Ack, RoundAnnouncement

    broker = MemoryBroker()
    cfg = updated(job(tmp_path, min_clients=2, deadline_s=60.0), job={"rounds": 3},
                  identity={"signing": "required"}, training={"epochs": 1, "batch_size": 32, "lr": 0.1})
    aggregator_key = Identity.generate()
    aggregator_key.save(tmp_path / "agg" / "aggregator.key")
    specs = []
    for spec in devices(tmp_path, 2):
        me = Identity.generate()
        Registry(tmp_path / "agg").enroll(spec.client_id, me.public)
        specs.append(dataclasses.replace(spec, identity=me, aggregator_key=aggregator_key.public))
    records = []
    with job_and_fleet(cfg, broker, specs, TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, fleet):
        wait_for(lambda: len(records) >= 1, 120)
        real = RoundAnnouncement.parse(wire.decode(broker.retained[TOPICS.round]))
        broker.publish("forger", TOPICS.round, dataclasses.replace(real, round=10**9).encode(), retain=True)
        broker.publish("forger", TOPICS.ack("dev-0"), Ack(JOB, 2, 1, "dev-0", "u", "rejected", "forged").encode())
        assert service.done.wait(120), records
    assert [r.status for r in records] == ["ok"] * 3 and all(r.clients == 2 for r in records)
    refused = sum((dev.refused for dev in fleet.devices.values()), start=Counter())
    assert refused["unsigned"] >= 3  # the announcement, to both devices, and the receipt
    assert service.core.counters.get("unsigned", 0) == 0  # every device message was signed


def test_the_aggregator_rotates_its_key_and_devices_follow_the_chain(tmp_path):
    """``fedge keys rotate`` leaves the next key beside the current one; at
    its next start the aggregator has the current key sign it into the key
    chain and signs with it from then on. Devices that pinned the first key
    walk the chain and train on; a chain link the current key did not sign
    moves nothing."""
    import dataclasses

    from fedge import wire
    from fedge.identity import Identity, next_key_path, sign_link
    from fedge.messages import KeyChain, KeyLink
    from fedge_cli.identity import provision

    broker = MemoryBroker()
    cfg = updated(job(tmp_path, min_clients=2, deadline_s=60.0), job={"rounds": 2},
                  identity={"signing": "required"}, training={"epochs": 1, "batch_size": 32, "lr": 0.1})
    first, keys = provision(tmp_path / "agg", ["dev-0", "dev-1"], tmp_path / "keys")
    specs = [dataclasses.replace(s, identity=keys[s.client_id], aggregator_key=first) for s in devices(tmp_path, 2)]
    records: list = []
    pool = TrainingPool(size=1, mode="warm", threads=1)
    fleet = AgentRuntime(specs, cfg.broker, pool, link_factory=broker.link)
    fleet.start()
    fleet_thread = threading.Thread(target=fleet.run, daemon=True)
    fleet_thread.start()

    def run_job(config) -> AggregatorService:
        service = AggregatorService(config, link_factory=broker.link, on_record=records.append)
        t = threading.Thread(target=service.run, daemon=True)
        t.start()
        try:
            assert service.done.wait(120), records
        finally:
            service.stop()
            t.join(10)
        return service

    try:
        run_job(cfg)
        nxt = Identity.generate()
        nxt.save(next_key_path(tmp_path / "agg" / "aggregator.key"))  # what `fedge keys rotate` does
        service = run_job(updated(cfg, job={"rounds": 4}))
        assert service.identity.public == nxt.public
        assert not next_key_path(tmp_path / "agg" / "aggregator.key").exists()
        assert all(dev.aggregator_key == nxt.public for dev in fleet.devices.values())
        # A forger's link from the current key to its own, sealed by itself, moves nothing.
        evil = Identity.generate()
        forged = KeyChain(JOB, (KeyLink(*sign_link(JOB, evil, evil.public)),
                                KeyLink(nxt.public.to_text(), evil.public.to_text(), "AAAA")))
        broker.publish("forger", TOPICS.keys, wire.seal(forged.encode(), evil), retain=True)
        wait_for(lambda: all(dev.refused["wrong_signer"] >= 1 for dev in fleet.devices.values()), 10)
        assert all(dev.aggregator_key == nxt.public for dev in fleet.devices.values())
    finally:
        fleet.stop()
        fleet_thread.join(10)
        fleet.close()
        pool.close()
    assert [r.round for r in records] == [1, 2, 3, 4] and all(r.status == "ok" and r.clients == 2 for r in records)
    # A device restarted later keeps following: its state holds where the chain led from its pin.
    again = AgentRuntime(specs[:1], cfg.broker, TrainingPool(size=1, mode="warm", threads=1),
                         link_factory=broker.link)
    try:
        assert again.devices["dev-0"].aggregator_key == nxt.public
    finally:
        again.close()
