"""A relayed job (``fedge relay``): the root, its relays and their regions'
devices on the in-memory broker; the real-broker runs are
``tests/integration/test_cluster.py``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.relay import RelayService, relay_config
from aggregator.service import AggregatorService
from edge_agent.pool import TrainingPool
from edge_agent.runtime import AgentRuntime, DeviceSpec
from fedge.config import updated
from fedge.transport import MemoryBroker

from .builders import SHELL_JOB, wait_for


def relayed(tmp: Path, relays: int = 2, rounds: int = 2, root_key: str = "", **selection: object
            ) -> AggregatorConfig:
    return updated(AggregatorConfig(), job={"name": SHELL_JOB, "rounds": rounds, "state_dir": str(tmp / "root")},
                   selection={"min_clients": 1, "settle_s": 0.0, "deadline_s": 30.0, **selection},
                   relays={"min_relays": relays, "margin_s": 2.0, "root_key": root_key},
                   identity={"signing": "required" if root_key else "off"})


def region_devices(tmp: Path, regions: dict[str, int], signed: bool = False) -> list[DeviceSpec]:
    """The regions' devices; ``signed``: each enrolled with its region's relay
    (keys made as ``fedge_cli.identity.provision`` makes them), pinning the
    relay's key and the root's."""
    from fedge.identity import Identity
    from fedge_cli.identity import provision

    total = sum(regions.values())
    root_key = Identity.load(tmp / "root" / "aggregator.key").public if signed else None
    specs, i = [], 0
    for region, n in regions.items():
        ids = [f"dev-{i + k}" for k in range(n)]
        relay_key, identities = (provision(tmp / f"relay-{region}", ids, tmp / "keys") if signed else (None, {}))
        for cid in ids:
            specs.append(DeviceSpec(client_id=cid, job=SHELL_JOB, region=region, data="fedge.datasets:digits",
                                    data_args={"client": i, "clients": total}, state_dir=tmp / cid, durable=False,
                                    identity=identities.get(cid), aggregator_key=relay_key, root_key=root_key))
            i += 1
    return specs


def signed_tree(tmp: Path, regions: dict[str, int]) -> AggregatorConfig:
    """Keys for a signed relayed job: the root's (its relays enrolled with
    it) and each relay's, in its state directory; the config pins the root's."""
    from fedge.identity import Identity
    from fedge_cli.identity import provision

    root_key, relays = provision(tmp / "root", list(regions), tmp / "keys")
    for region, identity in relays.items():
        (tmp / f"relay-{region}").mkdir(parents=True, exist_ok=True)
        identity.save(tmp / f"relay-{region}" / "aggregator.key")
        assert Identity.load(tmp / f"relay-{region}" / "aggregator.key").public == identity.public
    return relayed(tmp, relays=len(regions), root_key=root_key.to_text())


def _thread(target) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


@contextmanager
def tree(cfg: AggregatorConfig, broker: MemoryBroker, tmp: Path, regions: dict[str, int]
         ) -> Iterator[tuple[AggregatorService, dict[str, RelayService], AgentRuntime]]:
    root = AggregatorService(cfg, link_factory=broker.link)
    relays = {r: RelayService(relay_config(cfg, r, tmp / f"relay-{r}"), r, link_factory=broker.link) for r in regions}
    pool = TrainingPool(size=1, mode="warm", threads=1)
    specs = region_devices(tmp, regions, signed=cfg.identity.signing == "required")
    fleet = AgentRuntime(specs, cfg.broker, pool, link_factory=broker.link)
    fleet.start()
    threads = [_thread(s.run) for s in (root, *relays.values())] + [_thread(fleet.run)]
    with ExitStack() as stack:
        stack.callback(pool.close)
        stack.callback(fleet.close)
        for t in threads:
            stack.callback(t.join, 10)
        stack.callback(fleet.stop)
        for s in (root, *relays.values()):
            stack.callback(s.stop)
        yield root, relays, fleet


def test_a_relayed_round_folds_each_regions_sum_once_and_every_device_trains_the_roots_model(tmp_path):
    # Signed end to end (test_the_roots_model_is_the_fedavg... and the others run the cores unsigned).
    broker = MemoryBroker()
    regions = {"north": 3, "south": 2}
    cfg = signed_tree(tmp_path, regions)
    with tree(cfg, broker, tmp_path, regions) as (root, relays, fleet):
        wait_for(root.done.is_set, timeout=180)
        wait_for(lambda: all(r.done.is_set() for r in relays.values()), timeout=60)
        history = root.core.history
        assert [r.round for r in history] == [1, 2]
        for record in history:
            assert record.status == "ok", record
            assert record.clients == 2  # the relays
            assert record.extra["relayed"]["devices"] == 5
            assert record.extra["relayed"]["regions"]["north"]["devices"] == 3
            assert record.extra["relayed"]["regions"]["south"]["devices"] == 2
        for name, relay in relays.items():
            assert [r.round for r in relay.core.history] == [1, 2]
            assert relay.core.counters["region_sum_accepted"] == 2, (name, relay.core.counters)
            assert relay.core.counters["accepted"] == {"north": 6, "south": 4}[name]
        # The root never heard a device; the relays never published a model.
        assert root.core.counters["not_a_relay"] == 0
        assert root.core.counters["accepted"] == 4
        assert not [t for t in broker.retained if "/region/" in t and "/model/" in t]
        _a_relay_cannot_forge_the_model(tmp_path, root, fleet)


def _a_relay_cannot_forge_the_model(tmp: Path, root: AggregatorService, fleet: AgentRuntime) -> None:
    """A device believes a model only when the root signed it, and its
    region's announcements only when its relay did."""
    from fedge import wire
    from fedge.identity import Identity

    relay = Identity.load(tmp / "relay-north" / "aggregator.key")
    root_identity = root.identity
    assert root_identity is not None
    device = fleet.devices["dev-0"]
    model = root.core.models.key_message
    assert device.believed(wire.seal(model, root_identity), "a key message", 0.0, model=True)
    assert not device.believed(wire.seal(model, relay), "a key message", 0.0, model=True)
    assert device.refused["wrong_signer"] >= 1


# --- the round cores of a root and its relays (aggregator.modes.root, .relay) -----------------------------------

def _cores(regions: tuple[str, ...] = ("north", "south")):
    from .builders import PLAIN, make_core

    root = make_core(defences=PLAIN, tree="root", min_clients=len(regions), fraction=1.0, quorum=1.0)
    return root, {name: make_relay(name) for name in regions}


def _to_relay(relay, actions, now=1.0):
    """Deliver the root's announcements and receipts among ``actions`` to ``relay``."""
    from aggregator.events import FromRoot, PublishAnnouncement, SendAck
    from fedge import wire

    out = []
    for a in actions:
        if isinstance(a, PublishAnnouncement) or (isinstance(a, SendAck) and a.client == relay.mode.relay):
            out += relay.handle(FromRoot(wire.decode(a.message), now))
    return out


def _sent(actions):
    from aggregator.events import SendToRoot

    return [a.message for a in actions if isinstance(a, SendToRoot)]


def _region_round(root_actions, relay, devices, deltas, now=1.0):
    """``devices`` come online at ``relay``, the root's round (in
    ``root_actions``) reaches it and the devices send ``deltas``; what the
    relay did."""
    from aggregator.rounds import TimerFired

    from .builders import online, send, update

    out = online(relay, *devices, now=now)
    assert relay.open is None  # nothing opens before the root says so
    out += _to_relay(relay, root_actions, now=now)
    assert relay.open is not None and set(relay.open.selected) == set(devices)
    for dev, (delta, samples) in zip(devices, deltas, strict=True):
        out += send(relay, dev, update(relay, dev, delta=delta, samples=samples), now=now)
    out += relay.handle(TimerFired(now + 0.1))
    return out


def test_the_roots_model_is_the_fedavg_of_every_device_behind_its_relays():
    import numpy as np

    from aggregator.rounds import ClientStatus, MessageArrived, TimerFired

    from .builders import INITIAL, acks, delta_for, finished, reference_fedavg

    root, relays = _cores()
    out = []
    for name in relays:
        out += root.handle(ClientStatus(name, True, {"role": "relay"}, 0.0))
    assert root.open is not None and set(root.open.selected) == {"north", "south"}
    fleets = {"north": ["a", "b", "c"], "south": ["d", "e"]}
    deltas = {dev: (delta_for(dev), 10 + i) for i, dev in enumerate("abcde")}
    answers = {}
    for name, relay in relays.items():
        relay_out = _region_round(out, relay, fleets[name], [deltas[d] for d in fleets[name]])
        (answers[name],) = _sent(relay_out)
        assert relay.history[-1].status == "ok" and relay.history[-1].clients == len(fleets[name])
    root_out = []
    for name, msg in answers.items():
        root_out += root.handle(MessageArrived(name, msg, 2.0))
    assert [a.status for a in acks(root_out)] == ["accepted", "accepted"]
    root_out += root.handle(TimerFired(2.1))
    (fin,) = finished(root_out)
    assert fin.record.status == "ok" and fin.record.extra["relayed"]["devices"] == 5
    expected = reference_fedavg(INITIAL, list(deltas.values()))
    for k in INITIAL:
        np.testing.assert_allclose(root.models.exact[k], expected[k], rtol=1e-5, atol=1e-6)
    # The relays hear the next round, and train the root's new model.
    for relay in relays.values():
        _to_relay(relay, root_out, now=3.0)
        assert relay.model_digest == root.model_digest


def test_a_region_sum_is_folded_once_whatever_attempt_sent_it_and_a_late_one_is_counted():
    from aggregator.rounds import ClientStatus, MessageArrived, TimerFired

    from .builders import acks, delta_for

    root, relays = _cores()
    out = []
    for name in relays:
        out += root.handle(ClientStatus(name, True, {"role": "relay"}, 0.0))
    north, south = relays["north"], relays["south"]
    (msg,) = _sent(_region_round(out, north, ["a"], [(delta_for("a"), 10)]))
    first = root.handle(MessageArrived("north", msg, 2.0))
    again = root.handle(MessageArrived("north", msg, 2.1))  # QoS 1 redelivery
    assert [a.status for a in acks(first + again)] == ["accepted", "duplicate"]
    assert root.counters["accepted"] == 1
    # The root's deadline passes without the south: the round goes on with the north's sum.
    closed = root.handle(TimerFired(100.0))
    assert root.history[-1].status == "ok" and root.history[-1].clients == 1
    assert root.history[-1].extra["relayed"]["relays"] == 1
    # The south's sum of round 1, late, is counted as late.
    (late,) = _sent(_region_round(out, south, ["d"], [(delta_for("d"), 10)]))
    (ack,) = acks(root.handle(MessageArrived("south", late, 101.0)))
    assert ack.status == "late" and root.counters["late"] == 1
    # The south hears round 2 and answers it.
    _to_relay(south, closed, now=102.0)
    assert south.open is not None and south.open.round == 2


def test_a_restarted_root_gets_the_kept_sum_again_and_a_restarted_relay_resends_it_from_its_checkpoint():
    from aggregator.rounds import ClientStatus, MessageArrived

    from .builders import acks, delta_for

    root, relays = _cores(("north",))
    out = root.handle(ClientStatus("north", True, {"role": "relay"}, 0.0))
    north = relays["north"]
    answer_out = _region_round(out, north, ["a"], [(delta_for("a"), 10)])
    (msg,) = _sent(answer_out)
    # The relay checkpointed the sum before it left, and restarts from that checkpoint.
    from aggregator.rounds import SaveCheckpoint

    (save,) = [a for a in answer_out if isinstance(a, SaveCheckpoint)]
    at = answer_out.index(save)
    assert answer_out.index(next(a for a in answer_out if a.__class__.__name__ == "SendToRoot")) == at + 1
    reborn = make_relay("north")
    reborn.restore(save.arrays, save.meta, None)
    started = reborn.start(5.0)
    assert not _sent(started) and reborn.open is None  # it waits for the root
    # The root restarted too, before it heard the sum: round 1 again, attempt 2.
    root2, _ = _cores(("north",))
    root2.resume_round({"round": 1, "attempt": 1, "selected": ["north"], "model_digest": root2.model_digest})
    out2 = root2.start(6.0)
    root2.handle(ClientStatus("north", True, {"role": "relay"}, 6.0))
    resent = _sent(_to_relay(reborn, out2, now=6.0))
    assert len(resent) == 1 and reborn.counters["region_resent"] == 1
    (ack,) = acks(root2.handle(MessageArrived("north", resent[0], 7.0)))
    assert ack.status == "accepted"
    # The original copy, delivered late, is the same region's: a duplicate, never folded twice.
    (dup,) = acks(root2.handle(MessageArrived("north", msg, 7.1)))
    assert dup.status == "duplicate" and root2.counters["accepted"] == 1


def test_an_update_sent_to_the_root_and_a_malformed_region_sum_are_refused_and_counted():
    import numpy as np

    from aggregator.rounds import ClientStatus, MessageArrived
    from fedge import tensors
    from fedge.messages import RegionSum

    from .builders import acks, update

    root, _ = _cores(("north",))
    root.handle(ClientStatus("north", True, {"role": "relay"}, 0.0))
    root.handle(ClientStatus("pi-9", True, {}, 0.0))  # a device that talks to the root by mistake
    assert root.open is not None and root.open.selected == ("north",)
    (ack,) = acks(root.handle(MessageArrived("pi-9", update(root, "pi-9"), 1.0)))
    assert ack.status == "rejected" and "not_a_relay" in ack.reason
    wrong = RegionSum(job=root.job, round=1, attempt=1, sender="north", partial_id="1.1",
                      base_model=root.model_digest, weight=3.0, num_samples=3, devices=1, selected=1,
                      body=tensors.pack({"w": np.zeros((2, 2), np.float32)})).encode()
    (ack,) = acks(root.handle(MessageArrived("north", wrong, 1.0)))
    assert ack.status == "rejected" and ack.reason.startswith("shape")
    assert root.counters["shape"] == 1 and root.open is not None and not root.open.accepted


def test_a_regions_device_channels_live_under_it_and_the_model_channels_stay_the_jobs():
    from fedge.topics import JobTopics

    north, job = JobTopics("j", "north"), JobTopics("j")
    assert north.round == "fedge/v1/j/region/north/round"
    assert north.update("pi-1") == "fedge/v1/j/region/north/update/pi-1"
    assert north.key_chunk(0) == job.key_chunk(0) and north.delta_filter == job.delta_filter
    assert north.parse("fedge/v1/j/region/north/ack/pi-1") == ("ack", "pi-1")
    assert north.parse("fedge/v1/j/model/delta/3") == ("delta", None)
    # Another region's channels, and the root's, are not this region's.
    assert north.parse("fedge/v1/j/region/south/round") == ("", None)
    assert north.parse("fedge/v1/j/round") == ("", None)
    assert job.parse("fedge/v1/j/region/north/round") == ("", None)


def test_a_region_that_counts_nothing_declines_a_relay_left_behind_abandons_and_the_roots_end_is_the_relays():
    from aggregator.rounds import ClientStatus, MessageArrived, TimerFired
    from fedge import wire
    from fedge.wire import Kind

    from .builders import online

    root, relays = _cores()
    out = []
    for name in relays:
        out += root.handle(ClientStatus(name, True, {"role": "relay"}, 0.0))
    north, south = relays["north"], relays["south"]
    # The north's one device never answers: at its deadline the region declines the root's round.
    online(north, "a")
    _to_relay(north, out)
    assert north.open is not None
    declined = _sent(north.handle(TimerFired(1000.0)))
    assert [wire.decode(m).kind for m in declined] == [Kind.DECLINE]
    assert north.history[-1].status == "failed"
    root.handle(MessageArrived("north", declined[0], 1000.0))
    assert root.counters["declined"] == 1 and "north" in root.open.declined
    # The south is still gathering round 1 when the root, at its deadline, moves on: it abandons round 1.
    online(south, "d")
    _to_relay(south, out)
    assert south.open is not None and south.open.round == 1
    moved_on = root.handle(TimerFired(2000.0))
    assert root.history[-1].status == "failed" and root.next_round == 2
    _to_relay(south, moved_on, now=2000.0)
    assert south.counters["region_abandoned"] == 1 and south.open is not None and south.open.round == 2
    # The root's job ends (its announcement says done): so do its relays', an open region round abandoned.
    from aggregator.events import PublishAnnouncement, RoundState

    done = [PublishAnnouncement(root.announcement(RoundState.DONE, (), 2001.0))]
    _to_relay(south, done, now=2001.0)
    _to_relay(north, done, now=2001.0)
    assert south.state == "done" and north.state == "done" and south.open is None


def test_a_relay_not_asked_by_the_roots_round_waits_and_a_receipt_it_cannot_read_is_counted():
    from aggregator.events import FromRoot
    from aggregator.rounds import ClientStatus
    from fedge import wire
    from fedge.messages import Ack

    from .builders import online

    root, _ = _cores(("north", "south"))
    out = root.handle(ClientStatus("north", True, {"role": "relay"}, 0.0))
    out += root.handle(ClientStatus("south", True, {"role": "relay"}, 0.0))
    late = make_relay("west")
    online(late, "w1")
    _to_relay(late, out)
    assert late.open is None and late.state == "waiting"  # the root's round asked north and south only
    bogus = Ack(root.job, 1, 1, "west", "1.1", "maybe")
    assert late.handle(FromRoot(wire.decode(bogus.encode()), 1.0)) == []
    assert late.counters["root_malformed"] == 1
    # A root of more relays than it lists invites each: nothing malformed about it.
    from fedge.messages import Invite

    invite = Invite(root.job, 1, 1, "west", root.model_digest)
    assert late.handle(FromRoot(wire.decode(invite.encode()), 1.0)) == []
    assert late.counters["root_malformed"] == 1


def make_relay(name: str):
    from .builders import PLAIN, make_core

    core = make_core(defences=PLAIN, min_clients=1)
    core.relay_region(name)
    return core


def _with_one_lost_message(tmp_path: Path, cfg: AggregatorConfig, lost) -> tuple[AggregatorService, RelayService,
                                                                                  list[str]]:
    """A job of one relay (north, two devices) whose relay never gets the
    first message ``lost(topic, payload)`` picks; run to its end (60 s at
    most). Returns the root, the relay and the topic of what was lost."""
    from fedge.transport import Inbound

    broker = MemoryBroker()
    dropped: list[str] = []

    def lossy(settings, client_id, sink, **kw):
        def deaf_once(event):
            if (client_id.startswith("fedge-relay") and isinstance(event, Inbound) and not dropped
                    and lost(event.topic, event.payload)):
                dropped.append(event.topic)
                return
            sink(event)
        return broker.link(settings, client_id, deaf_once, **kw)

    root = AggregatorService(cfg, link_factory=broker.link)
    north = RelayService(relay_config(cfg, "north", tmp_path / "relay-north"), "north", link_factory=lossy)
    pool = TrainingPool(size=1, mode="warm", threads=1)
    fleet = AgentRuntime(region_devices(tmp_path, {"north": 2}), cfg.broker, pool, link_factory=broker.link)
    fleet.start()
    threads = [_thread(s.run) for s in (root, north, fleet)]
    try:
        wait_for(root.done.is_set, timeout=60)
    finally:
        for s in (root, north, fleet):
            s.stop()
        for t in threads:
            t.join(10)
        fleet.close()
        pool.close()
    return root, north, dropped


def test_a_relay_that_missed_the_roots_announcement_asks_for_it_again(tmp_path, monkeypatch):
    # On a broker node under load, a message can fail to reach a subscriber. A relay waiting on the root's
    # round would wait for the root's deadline; it subscribes again after ROOT_REFRESH_S of silence and the
    # retained announcement comes back.
    from aggregator import relay as relay_module

    monkeypatch.setattr(relay_module, "ROOT_REFRESH_S", 1.0)
    cfg = relayed(tmp_path, relays=1, rounds=2, deadline_s=120.0)  # the job ends well before this deadline
    root, north, dropped = _with_one_lost_message(  # the root's first open round never arrives
        tmp_path, cfg, lambda topic, payload: topic.endswith(f"{SHELL_JOB}/round") and b"open" in payload)
    assert dropped and north.core.counters["root_refreshed"] >= 1
    assert [r.extra["relayed"]["devices"] for r in root.core.history] == [2, 2]


def test_a_region_that_missed_a_devices_presence_reads_the_retained_presence_again(tmp_path, monkeypatch):
    # Found at 10,000 devices on a NATS cluster: the broker held every device of three regions online, and
    # their relays waited for devices for good. A job waiting for devices, with no presence heard for a
    # while, subscribes to the presence again and the retained copies come back.
    from aggregator import retained

    monkeypatch.setattr(retained, "PRESENCE_REFRESH_S", (1.0, 4.0))
    cfg = relayed(tmp_path, relays=1, rounds=1, min_clients=2)
    root, north, dropped = _with_one_lost_message(  # dev-1's presence never reaches the relay
        tmp_path, cfg, lambda topic, payload: topic.endswith("/status/dev-1"))
    assert dropped and north.core.counters["presence_refreshed"] >= 1
    assert root.core.history[-1].extra["relayed"]["devices"] == 2


def test_a_replayed_older_announcement_of_the_root_changes_nothing_in_the_region():
    from aggregator.events import FromRoot
    from aggregator.rounds import ClientStatus, MessageArrived, TimerFired
    from fedge import wire

    from .builders import announcement, delta_for

    root, relays = _cores(("north",))
    north = relays["north"]
    first = root.handle(ClientStatus("north", True, {"role": "relay"}, 0.0))
    old = announcement(first)
    (msg,) = _sent(_region_round(first, north, ["a"], [(delta_for("a"), 10)]))
    closed = root.handle(MessageArrived("north", msg, 2.0)) + root.handle(TimerFired(2.1))
    _to_relay(north, closed, now=3.0)
    assert north.open is not None and north.open.round == 2 and north.model_digest == root.model_digest
    # Round 1's announcement again (signed by the root, so believed, but old): ignored, the model kept.
    assert north.handle(FromRoot(wire.decode(old.encode()), 4.0)) == []
    assert north.counters["root_stale"] == 1 and north.model_digest == root.model_digest
    assert north.open is not None and north.open.round == 2
