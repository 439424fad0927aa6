"""The aggregator with identity.signing = "required", on the memory broker:
it signs what it publishes and believes only enrolled devices' signatures."""

from __future__ import annotations

import numpy as np

from aggregator.registry import Registry
from fedge import chunks, wire
from fedge.codecs import make_codec, supported
from fedge.config import updated
from fedge.identity import Identity, check_signed
from fedge.messages import Ack, RoundAnnouncement, Status, Update
from fedge.transport import MemoryBroker

from .builders import SHELL_JOB as JOB
from .builders import TOPICS, job, running, wait_for


def signed_job(tmp_path):
    return updated(job(tmp_path), identity={"signing": "required"})


def presence(me: Identity, client: str, seq: int, state: str = "online") -> bytes:
    return wire.encode(wire.Kind.STATUS, {"sender": client, "state": state, "info": {"codecs": supported()},
                                          "seq": seq}, signer=me)


def signed_update(service, me: Identity, client: str, update_id: str = "u1") -> bytes:
    core = service.core
    delta = {name: np.full(shape, 0.01, np.float32) for name, shape in core.spec.entries}
    plain = Update(job=JOB, round=core.next_round, sender=client, update_id=update_id, num_samples=10,
                   codec=core.codec_params, base_model=core.model_digest,
                   body=make_codec(core.codec_params).encode(delta, np.random.default_rng(0))).encode()
    return wire.seal(plain, me)


def send_update(broker, sender: str, client: str, message: bytes) -> None:
    for part in chunks.split(message, 100_000):
        broker.publish(sender, TOPICS.update(client), part)


def announcement(broker):
    payload = broker.retained.get(TOPICS.round)
    return (wire.decode(payload), RoundAnnouncement.parse(wire.decode(payload))) if payload else (None, None)


def acks_to(broker, client):
    return [Ack.parse(wire.decode(p)) for _, t, p, _ in broker.published if t == TOPICS.ack(client)]


def test_only_enrolled_devices_signed_presence_and_updates_count(tmp_path):
    cfg = signed_job(tmp_path)
    dev, forger = Identity.generate(), Identity.generate()
    Registry(tmp_path / "agg").enroll("dev-1", dev.public)
    broker = MemoryBroker()
    with running(cfg, broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))
        aggregator_key = service.identity.public
        check_signed(wire.decode(broker.retained[TOPICS.server]), aggregator_key, "aggregator presence")
        # An unenrolled device and an unsigned presence are not believed; the enrolled one is.
        broker.publish("ghost", TOPICS.status("ghost"), presence(forger, "ghost", 1), retain=True)
        broker.publish("x", TOPICS.status("dev-2"), Status("dev-2", "online", {}).encode(), retain=True)
        broker.publish("dev-1", TOPICS.status("dev-1"), presence(dev, "dev-1", 5), retain=True)
        wait_for(lambda: (a := announcement(broker)[1]) is not None and a.state == "open")
        env, ann = announcement(broker)
        check_signed(env, aggregator_key, "announcement")
        assert ann.selected == ("dev-1",) and env.header["seq"] > 0 and env.header["session"]
        counters = service.core.counters
        assert counters["unknown_signer"] == 1 and counters["unsigned"] == 1
        # A forged update under dev-1's id: refused, and dev-1 gets no receipt it would act on.
        send_update(broker, "forger", "dev-1", signed_update(service, forger, "dev-1", "u-forged"))
        wait_for(lambda: counters["wrong_signer"] == 1)
        assert acks_to(broker, "dev-1") == []
        # A replayed older "online" is refused.
        broker.publish("forger", TOPICS.status("dev-1"), presence(dev, "dev-1", 3), retain=True)
        wait_for(lambda: counters["replayed_status"] == 1)
        assert "dev-1" in service.core.roster.online
        # dev-1's own update counts, and its receipt is signed by the aggregator.
        send_update(broker, "dev-1", "dev-1", signed_update(service, dev, "dev-1"))
        wait_for(lambda: counters["accepted"] == 1)
        receipt = next(p for _, t, p, _ in broker.published if t == TOPICS.ack("dev-1"))
        check_signed(wire.decode(receipt), aggregator_key, "receipt")


def test_a_revoked_device_is_refused_from_its_next_message(tmp_path):
    cfg = signed_job(tmp_path)
    dev = Identity.generate()
    Registry(tmp_path / "agg").enroll("dev-1", dev.public)
    broker = MemoryBroker()
    with running(cfg, broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))
        broker.publish("dev-1", TOPICS.status("dev-1"), presence(dev, "dev-1", 1), retain=True)
        wait_for(lambda: "dev-1" in service.core.roster.online)
        Registry(tmp_path / "agg").revoke("dev-1")  # the operator, from another process
        send_update(broker, "dev-1", "dev-1", signed_update(service, dev, "dev-1"))
        wait_for(lambda: service.core.counters["unknown_signer"] == 1)
        assert service.core.counters["accepted"] == 0 and "dev-1" not in service.core.roster.online


def test_the_aggregator_key_is_made_once_and_kept(tmp_path):
    broker = MemoryBroker()
    with running(signed_job(tmp_path), broker) as service:
        first = service.identity.public
    with running(signed_job(tmp_path), broker) as service:
        assert service.identity.public == first
    assert (tmp_path / "agg" / "aggregator.key").stat().st_mode & 0o777 == 0o600


def test_a_key_file_others_can_read_is_a_config_error(tmp_path):
    import os

    import pytest

    from aggregator.service import AggregatorService
    from fedge.config import ConfigError

    key = tmp_path / "agg.key"
    Identity.generate().save(key)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        AggregatorService(updated(signed_job(tmp_path), identity={"key_file": str(key)}),
                          link_factory=MemoryBroker().link)


def test_a_device_enrolled_while_the_job_runs_is_taken_within_seconds(tmp_path):
    """The README's order: the agent starts (its presence is refused: its key
    is not enrolled), the operator runs fedge enroll, and the device takes
    part with no restart of anything (issue 26, item 3)."""
    cfg = updated(signed_job(tmp_path), selection={"min_clients": 2})
    early, late = Identity.generate(), Identity.generate()
    Registry(tmp_path / "agg").enroll("dev-1", early.public)
    broker = MemoryBroker()
    with running(cfg, broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))
        broker.publish("dev-1", TOPICS.status("dev-1"), presence(early, "dev-1", 1), retain=True)
        broker.publish("dev-2", TOPICS.status("dev-2"), presence(late, "dev-2", 1), retain=True)
        wait_for(lambda: service.core.counters["unknown_signer"] == 1)
        assert "dev-2" not in service.core.roster.online and service.core.open is None
        Registry(tmp_path / "agg").enroll("dev-2", late.public)  # the operator, from another process
        wait_for(lambda: (a := announcement(broker)[1]) is not None and a.state == "open")
        assert set(announcement(broker)[1].selected) == {"dev-1", "dev-2"}
        # Revoked while idle: offline within seconds, before it sends anything.
        Registry(tmp_path / "agg").revoke("dev-2")
        wait_for(lambda: "dev-2" not in service.core.roster.online)
