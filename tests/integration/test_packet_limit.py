"""A broker whose packet limit is below broker.max_packet_bytes: the link
learns the limit (MQTT 5 from CONNACK, 3.1.1 from the dropped connections)
and delivers, instead of reconnecting once a second for ever."""

from __future__ import annotations

import logging
import os
import threading

import paho.mqtt.client as paho
import pytest

from fedge.chunks import Reassembler
from fedge.mqtt import MIN_PACKET_BYTES, LinkDown, MqttLink, lowered_limit
from fedge.transport import Inbound, LinkEvent
from tests.integration.support import broker_settings, wait_for

pytestmark = pytest.mark.integration

BROKER_LIMIT = 8192
CONFIGURED = 65536


class Receiver:
    """A link that reassembles what arrives on ``lim/<stream>/<i>``."""

    def __init__(self, url: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.plain: list[bytes] = []
        self._parts = Reassembler(timeout_s=60)
        self._lock = threading.Lock()
        self.link = MqttLink(broker_settings(url), f"rx-{os.getpid()}", self._hear, subscriptions=["lim/#"],
                             persistent=False)

    def _hear(self, ev: LinkEvent) -> None:
        if not isinstance(ev, Inbound):
            return
        _, stream, _ = ev.topic.split("/", 2)
        with self._lock:
            if stream == "plain":
                self.plain.append(ev.payload)
                return
            whole = self._parts.feed(stream, ev.payload, 0.0)
            if whole is not None:
                self.messages.append((stream, whole))

    def got(self, stream: str, message: bytes) -> bool:
        with self._lock:
            return (stream, message) in self.messages


@pytest.fixture
def limited(mosquitto_factory):
    broker = mosquitto_factory(extra=f"max_packet_size {BROKER_LIMIT}\n")
    rx = Receiver(broker.url)
    rx.link.start()
    assert rx.link.wait_connected(10)
    made: list[MqttLink] = []

    def publisher(protocol: str) -> tuple[MqttLink, list[LinkEvent]]:
        events: list[LinkEvent] = []
        settings = broker_settings(broker.url, protocol=protocol, max_packet_bytes=CONFIGURED)
        link = MqttLink(settings, f"tx-{protocol}", events.append, persistent=False)
        made.append(link)
        return link, events

    yield rx, publisher
    for link in made:
        link.stop()
    rx.link.stop()


def chunked_topic(stream: str):
    return lambda i: f"lim/{stream}/{i}"


def downs(events: list[LinkEvent]) -> list[LinkDown]:
    return [ev for ev in events if isinstance(ev, LinkDown)]


def limit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fedge.mqtt" and "broker.max_packet_bytes=65536" in r.getMessage()]


def test_mqtt5_link_chunks_below_the_limit_the_broker_announces(limited, caplog):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    rx, publisher = limited
    tx, events = publisher("5")
    early, late = os.urandom(100_000), os.urandom(100_000)
    # Queued before the first CONNACK, so chunked for the configured 64 KB:
    # chunked again once the broker's limit is known, before anything is sent.
    tx.publish_chunked(chunked_topic("early"), early)
    tx.start()
    assert tx.wait_connected(10)
    assert tx.max_packet_bytes == BROKER_LIMIT
    tx.publish_chunked(chunked_topic("late"), late)
    wait_for(lambda: rx.got("early", early) and rx.got("late", late), 20, "both messages, whole")

    # A plain message over the limit is refused, not sent to get us dropped.
    info = tx.publish("lim/plain/0", bytes(BROKER_LIMIT))
    assert info.rc == paho.MQTT_ERR_PAYLOAD_SIZE
    assert tx.refused == 1
    tx.publish("lim/plain/1", b"small")
    wait_for(lambda: rx.plain == [b"small"], 10, "the small message")

    assert downs(events) == []
    lines = limit_lines(caplog)
    assert len(lines) == 2, lines  # the limit learned, once; the refusal
    assert "8192" in lines[0] and "Maximum Packet Size" in lines[0]


def test_mqtt311_link_learns_the_limit_in_a_few_reconnects(limited, caplog):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    rx, publisher = limited
    tx, events = publisher("3.1.1")
    tx.start()
    assert tx.wait_connected(10)
    first = os.urandom(100_000)
    tx.publish_chunked(chunked_topic("first"), first)
    wait_for(lambda: rx.got("first", first), 25, "the message, whole, after the link learned the limit")
    dropped = len(downs(events))
    assert 2 <= dropped <= 8, downs(events)  # two drops per halving: one drop alone is never blamed
    assert MIN_PACKET_BYTES <= tx.max_packet_bytes <= BROKER_LIMIT
    assert "over the broker's packet limit" in downs(events)[1].reason
    lines = limit_lines(caplog)
    assert len(lines) == dropped // 2  # one line each time the limit was lowered
    # Learned for good: the next message goes through without a drop.
    second = os.urandom(100_000)
    tx.publish_chunked(chunked_topic("second"), second)
    wait_for(lambda: rx.got("second", second), 10, "the second message")
    assert len(downs(events)) == dropped


def test_mqtt311_link_gives_up_a_plain_message_over_the_limit(limited, caplog):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    rx, publisher = limited
    tx, events = publisher("3.1.1")
    tx.start()
    assert tx.wait_connected(10)
    tx.publish("lim/plain/big", bytes(3 * BROKER_LIMIT // 2))
    tx.publish("lim/plain/after", b"after")
    # paho resends in order: "after" arriving means the oversized message is
    # no longer sent ahead of it on every reconnect.
    wait_for(lambda: rx.plain == [b"after"], 20, "the message queued after the oversized one")
    assert len(downs(events)) == 2  # the second drop with it outstanding convicts it
    assert tx.refused == 1
    given_up = [line for line in limit_lines(caplog) if line.startswith("tx-3.1.1: not publishing")]
    assert len(given_up) == 1 and "lim/plain/big" in given_up[0]


def test_the_limit_is_halved_never_below_what_fits_and_then_gives_up():
    assert lowered_limit(65536, 64530, 0) == 32265
    assert lowered_limit(32265, 31260, 20000) == 20000  # the broker took 20000 bytes already
    assert lowered_limit(65536, 3000, 0) == MIN_PACKET_BYTES  # chunks cannot be smaller
    assert lowered_limit(MIN_PACKET_BYTES, 1500, 0) == 1499  # even a small chunk was refused: give up
    assert lowered_limit(MIN_PACKET_BYTES, 1500, 1400) == 1499


def test_drops_with_a_small_publish_outstanding_never_lower_the_limit_below_what_chunking_needs():
    # Found on a NATS cluster whose node was killed: the gateway dropped a
    # device twice while its 1,143-byte update (sent again for want of a
    # receipt) was outstanding, the link took that as the broker's packet
    # limit, and the device gave up every update from then on.
    link = MqttLink(broker_settings("mqtt://127.0.0.1:9"), "flaky", lambda ev: None, persistent=False)
    link.publish("t/update", b"u" * 1100)  # queued: never acknowledged
    for _ in range(3):
        assert link._blame_packet_size() == ""
    assert link._limit == CONFIGURED_DEFAULT and link.chunk_bytes > 0
    # Above it, the same evidence still lowers the limit (and chunking goes on below it).
    link.publish("t/big", b"b" * 20000)
    link._blame_packet_size()
    link._blame_packet_size()
    assert MIN_PACKET_BYTES <= link._limit < 20000 and link.chunk_bytes > 0


CONFIGURED_DEFAULT = 262144
