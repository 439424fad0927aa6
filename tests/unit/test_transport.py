"""The in-memory transport behaves as the shells expect a broker to:
retained messages, wildcards, persistent sessions, last wills, redelivery."""

from __future__ import annotations

import pytest

from fedge.config import BrokerSettings
from fedge.transport import Inbound, LinkDown, LinkUp, MemoryBroker, topic_matches


@pytest.mark.parametrize("pattern, topic, match", [
    ("fedge/v1/job/update/+", "fedge/v1/job/update/dev-1", True),
    ("fedge/v1/job/update/+", "fedge/v1/job/update/dev-1/0", False),
    ("fedge/v1/job/#", "fedge/v1/job/update/dev-1/0", True),
    ("fedge/v1/job/#", "fedge/v1/job", True),
    ("fedge/v1/+/round", "fedge/v1/job/round", True),
    ("fedge/v1/job/round", "fedge/v1/job/rounds", False),
])
def test_topic_filters(pattern, topic, match):
    assert topic_matches(pattern, topic) is match


def connect(broker, client, subscriptions=(), **kw):
    events = []
    link = broker.link(None, client, events.append, subscriptions=subscriptions, **kw)
    link.start()
    return link, events


def inbound(events):
    return [(e.topic, e.payload, e.retain) for e in events if isinstance(e, Inbound)]


def test_retained_messages_reach_late_subscribers_and_an_empty_payload_clears_them():
    broker = MemoryBroker()
    pub, _ = connect(broker, "agg")
    pub.publish("job/key/0", b"model", retain=True)
    pub.publish("job/key/1", b"tail", retain=True)
    pub.clear_retained("job/key/1")
    _, events = connect(broker, "dev", ["job/key/+"])
    assert inbound(events) == [("job/key/0", b"model", True)]
    assert isinstance(events[0], LinkUp) and events[0].session_present is False


def test_a_persistent_session_queues_messages_while_the_client_is_away():
    broker = MemoryBroker()
    dev, _ = connect(broker, "dev", ["job/ack/dev"])
    dev.stop()
    agg, _ = connect(broker, "agg")
    agg.publish("job/ack/dev", b"receipt")
    _, events = connect(broker, "dev", ["job/ack/dev"])
    assert events[0] == LinkUp("dev", True)
    assert inbound(events) == [("job/ack/dev", b"receipt", False)]


def test_a_crash_publishes_the_last_will_and_a_clean_stop_does_not():
    broker = MemoryBroker()
    _, events = connect(broker, "agg", ["job/status/+"])
    _, dev_events = connect(broker, "dev", will=("job/status/dev", b"offline"))
    broker.crash("dev")
    assert ("job/status/dev", b"offline", False) in inbound(events)
    assert isinstance(dev_events[-1], LinkDown)
    assert broker.retained["job/status/dev"] == b"offline"
    other, _ = connect(broker, "dev2", will=("job/status/dev2", b"offline"))
    other.stop(final=("job/status/dev2", b"bye"))
    assert broker.retained["job/status/dev2"] == b"bye"


def test_redelivery_mode_delivers_every_message_twice_and_counts_bytes():
    broker = MemoryBroker(duplicates=True)
    _, events = connect(broker, "agg", ["job/update/+"])
    dev, _ = connect(broker, "dev")
    dev.publish("job/update/dev", b"12345")
    assert inbound(events) == [("job/update/dev", b"12345", False)] * 2
    assert dev.bytes_out == 5


def test_unsubscribing_stops_delivery_and_chunked_publishes_split_below_the_packet_size():
    broker = MemoryBroker(max_packet_bytes=4096)
    sub, events = connect(broker, "agg", ["job/x/+"])
    pub, _ = connect(broker, "dev")
    parts = pub.publish_chunked(lambda i: f"job/x/{i}", bytes(12000))
    assert len(parts) == len(inbound(events)) > 2
    sub.unsubscribe("job/x/+")
    pub.publish("job/x/9", b"more")
    assert len(inbound(events)) == len(parts)
    with pytest.raises(ValueError):
        pub.publish("job/+/x", b"")


def test_a_device_asks_qos_1_only_for_its_receipts_and_none_with_receipts_qos_0(tmp_path):
    # Retained state comes again with every subscription: QoS 0 keeps it out of the broker's session state
    # (on NATS's MQTT gateway, a JetStream consumer for every QoS 1 subscription).
    from edge_agent.runtime import DeviceSpec, _Device
    from fedge.mqtt import Inbox
    from fedge.topics import JobTopics

    topics = JobTopics("j", "east")
    wanted = (topics.round, topics.keys, topics.ack("pi"), topics.status("pi"), topics.key_filter,
              topics.delta_filter, topics.artifact_filter("m"))
    asked = {t: topics.subscription_qos(t) for t in wanted}
    assert [t for t, q in asked.items() if q == 1] == [topics.ack("pi")]
    broker = MemoryBroker()
    for receipts_qos in (1, 0):
        spec = DeviceSpec(client_id="pi", job="j", region="east", data="fedge.datasets:digits", data_args={},
                          state_dir=tmp_path / f"pi{receipts_qos}", receipts_qos=receipts_qos)
        dev = _Device(spec, BrokerSettings(), Inbox(), broker.link)
        assert dev.link.qos_of(topics.ack("pi")) == receipts_qos and dev.link.qos_of(topics.round) == 0
