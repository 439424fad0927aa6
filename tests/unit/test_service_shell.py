"""The aggregator's shell on the in-memory transport: what it publishes and
clears, and how it turns presence into rounds, with no broker process."""

from __future__ import annotations

import threading
import time

from aggregator.service import AggregatorService
from fedge import wire
from fedge.codecs import supported
from fedge.config import updated
from fedge.files import atomic_write
from fedge.messages import RoundAnnouncement, Status
from fedge.transport import MemoryBroker

from .builders import SHELL_JOB as JOB
from .builders import TOPICS, job, running, wait_for


def announcement(broker: MemoryBroker) -> RoundAnnouncement | None:
    payload = broker.retained.get(TOPICS.round)
    return RoundAnnouncement.parse(wire.decode(payload)) if payload else None


def test_stale_retained_chunks_of_a_longer_earlier_model_are_cleared(tmp_path):
    broker = MemoryBroker()
    stale = [TOPICS.key_chunk(i) for i in range(40)]
    for topic in stale:
        broker.publish("earlier-aggregator", topic, b"stale chunk", retain=True)
    (tmp_path / "agg").mkdir()
    atomic_write(tmp_path / "agg" / "published.json", b'{"key": 40}')
    with running(job(tmp_path), broker):
        wait_for(lambda: TOPICS.key_chunk(39) not in broker.retained)
        kept = [t for t in stale if t in broker.retained]
        assert kept and all(broker.retained[t] != b"stale chunk" for t in kept)
        assert len(kept) < len(stale), "only the new model's chunks remain"


def test_presence_opens_a_round_and_a_broken_presence_is_counted_not_fatal(tmp_path):
    broker = MemoryBroker(duplicates=True)  # QoS 1 redelivery: every message twice
    with running(job(tmp_path), broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))
        broker.publish("intruder", TOPICS.status("dev-1"), b"not a fedge message", retain=True)
        broker.publish("dev-2", TOPICS.status("dev-2"), Status("dev-2", "online", {"codecs": supported()}).encode(),
                       retain=True)
        wait_for(lambda: (ann := announcement(broker)) is not None and ann.state == "open")
        assert announcement(broker).selected == ("dev-2",)
        wait_for(lambda: service.core.counters["bad_status"] >= 1)
        assert Status.parse(wire.decode(broker.retained[TOPICS.server])).state == "online"
    assert Status.parse(wire.decode(broker.retained[TOPICS.server])).state == "offline"


def test_a_restart_before_the_first_checkpoint_reopens_the_round_with_the_next_attempt(tmp_path):
    broker = MemoryBroker()
    online = Status("dev-2", "online", {"codecs": supported()}).encode()
    broker.publish("dev-2", TOPICS.status("dev-2"), online, retain=True)
    with running(job(tmp_path, deadline_s=600.0), broker):
        wait_for(lambda: (ann := announcement(broker)) is not None and ann.state == "open")
        first = announcement(broker)
    assert not (tmp_path / "agg" / "checkpoint.safetensors").exists()
    with running(job(tmp_path, deadline_s=600.0), broker):
        wait_for(lambda: (ann := announcement(broker)) is not None and ann.attempt > first.attempt)
        again = announcement(broker)
    assert (again.round, again.selected, again.attempt) == (first.round, first.selected, first.attempt + 1)


def test_a_presence_whose_info_is_not_an_object_is_counted_and_the_job_goes_on(tmp_path):
    """Issue 11, case 1: one retained presence killed the aggregator on every restart."""
    from fedge.wire import Kind

    broker = MemoryBroker()
    hostile = wire.encode(Kind.STATUS, {"sender": "dev-1", "state": "online", "info": "not an object"})
    broker.publish("dev-1", TOPICS.status("dev-1"), hostile, retain=True)
    broker.publish("dev-2", TOPICS.status("dev-2"), Status("dev-2", "online", {"codecs": supported()}).encode(),
                   retain=True)
    with running(job(tmp_path), broker) as service:
        wait_for(lambda: (ann := announcement(broker)) is not None and ann.state == "open")
        assert announcement(broker).selected == ("dev-2",)
        assert service.core.counters["bad_status"] >= 1 and service.core.counters["internal_error"] == 0


def test_a_failure_inside_the_core_is_contained_counted_and_logged_once(tmp_path, caplog):
    broker = MemoryBroker()
    with running(job(tmp_path), broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))
        original = service.core.handle
        calls = {"n": 0}

        def flaky(event):
            if type(event).__name__ == "TimerFired" and calls["n"] < 3:
                calls["n"] += 1
                raise RuntimeError("a bug no input may trigger")
            return original(event)

        service.core.handle = flaky
        wait_for(lambda: calls["n"] == 3 and service.core.counters["internal_error"] == 3)
        assert service.done.is_set() is False and service.link.connected.is_set()
    assert sum("counted as internal_error" in r.getMessage() for r in caplog.records) == 1


def _online(broker: MemoryBroker, client: str) -> None:
    broker.publish(client, TOPICS.status(client), Status(client, "online", {"codecs": supported()}).encode(),
                   retain=True)


def _update(service: AggregatorService, client: str) -> bytes:
    import numpy as np

    from fedge.codecs import make_codec
    from fedge.messages import Update

    core = service.core
    delta = {name: np.full(shape, 0.01, np.float32) for name, shape in core.spec.entries}
    return Update(job=JOB, round=core.next_round, sender=client, update_id="u1", num_samples=10,
                  codec=core.codec_params, base_model=core.model_digest,
                  body=make_codec(core.codec_params).encode(delta, np.random.default_rng(0))).encode()


def test_a_reassembly_flood_from_devices_no_round_waits_for_cannot_block_a_real_update(tmp_path):
    """Fault campaign case 4: 16 one-KiB publishes each claiming a 16 MiB
    message blocked real updates for 122 s. Now they reserve nothing."""
    from fedge.chunks import CHUNK_HEADER, CHUNK_MAGIC, split

    broker = MemoryBroker()
    with running(job(tmp_path), broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))  # subscribed
        _online(broker, "dev-1")
        wait_for(lambda: (ann := announcement(broker)) is not None and ann.state == "open")
        for i in range(16):
            head = CHUNK_HEADER.pack(CHUNK_MAGIC, 1, 0, bytes([i]) * 16, 0, 16 * 64, 16 << 20)
            broker.publish(f"x{i}", TOPICS.update(f"x{i}"), head + b"\0" * 1024)
        wait_for(lambda: service.core.counters["chunk_not_selected"] == 16)
        for part in split(_update(service, "dev-1"), 1024):  # many chunks
            broker.publish("dev-1", TOPICS.update("dev-1"), part)
        wait_for(lambda: service.core.counters["accepted"] == 1)
        assert len(service.updates) == 0


def test_a_device_over_its_message_rate_is_dropped_and_counted(tmp_path):
    broker = MemoryBroker()
    with running(updated(job(tmp_path), limits={"messages_per_s": 1.0, "message_burst": 5}), broker) as service:
        wait_for(lambda: broker.retained.get(TOPICS.server))  # subscribed
        for _ in range(50):
            _online(broker, "chatty")
        wait_for(lambda: service.core.counters["rate_limited"] >= 40)
        wait_for(lambda: (ann := announcement(broker)) is not None and ann.state == "open")
        assert announcement(broker).selected == ("chatty",)  # what got through still counts


def test_a_jobs_end_is_a_state_the_service_keeps_until_stopped(tmp_path):
    """The last round closes; the service stays up with the final state
    published and the metrics saying done (a scrape must see the end; an
    exit would read as a crash), until stopped (issue 26, item 4)."""
    cfg = job(tmp_path, deadline_s=0.3, min_updates=1)
    cfg = updated(cfg, job={"rounds": 1})
    broker = MemoryBroker()
    with running(cfg, broker) as service:
        broker.publish("dev-1", TOPICS.status("dev-1"), Status("dev-1", "online", {"codecs": supported()}).encode(),
                       retain=True)
        wait_for(service.done.is_set)
        time.sleep(1.0)
        thread = next(t for t in threading.enumerate() if getattr(t, "_target", None) == service.run)
        assert thread.is_alive()
        assert announcement(broker).state == "done"
        snap = service._metrics_snapshot()
        assert snap["done"] and snap["round"] == 1
        assert Status.parse(wire.decode(broker.retained[TOPICS.server])).state == "online"


def test_job_linger_s_exits_by_itself_that_long_after_the_end(tmp_path):
    cfg = updated(job(tmp_path, deadline_s=0.3), job={"rounds": 1, "linger_s": 0.5})
    broker = MemoryBroker()
    service = AggregatorService(cfg, link_factory=broker.link)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(service.run()), daemon=True)
    thread.start()
    broker.publish("dev-1", TOPICS.status("dev-1"), Status("dev-1", "online", {"codecs": supported()}).encode(),
                   retain=True)
    thread.join(30)
    assert result == [0] and service.done.is_set()
    assert Status.parse(wire.decode(broker.retained[TOPICS.server])).state == "offline"
