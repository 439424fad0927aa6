"""MQTT links release everything they hold when stopped."""

from __future__ import annotations

import os

from fedge.mqtt import MqttLink
from tests.integration.support import broker_settings


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stopped_links_leave_no_descriptors_behind(mosquitto):
    # A simulated fleet or a benchmark opens and closes hundreds of links in
    # one process; paho's select() fails once descriptors pass 1024.
    settings = broker_settings(mosquitto.url)

    def cycle(n: int) -> None:
        links = [MqttLink(settings, f"leak-{i}", lambda ev: None, persistent=False) for i in range(n)]
        for link in links:
            link.start()
        for link in links:
            assert link.wait_connected(10), "link did not connect"
        for link in links:
            link.stop()

    cycle(5)  # warm up whatever paho and the resolver cache
    before = open_descriptors()
    cycle(20)
    assert open_descriptors() - before <= 2


def test_the_queue_bound_holds_while_disconnected_and_never_cuts_a_burst(mosquitto):
    # broker.max_queued_messages is what is kept while the broker is away. The
    # aggregator answers a round's thousands of updates with a receipt each,
    # in a burst: those were cut at the bound too, on a live connection.
    import threading

    from tests.integration.support import wait_for

    got: list[bytes] = []
    lock = threading.Lock()

    def sink(ev) -> None:
        if getattr(ev, "topic", "") == "q/t":
            with lock:
                got.append(ev.payload)

    # A persistent session: the broker keeps the reader's subscription over its restart.
    reader = MqttLink(broker_settings(mosquitto.url), "q-reader", sink, subscriptions=["q/t"], persistent=True)
    reader.start()
    assert reader.wait_connected(10)
    mosquitto.stop()
    writer = MqttLink(broker_settings(mosquitto.url, max_queued_messages=50), "q-writer", lambda ev: None,
                      persistent=False)
    writer.start()
    try:
        for i in range(80):  # the broker is down: 50 are kept, 30 given up and counted
            writer.publish("q/t", b"down-%d" % i)
        assert writer.messages_dropped == 30
        assert len(writer._sent) == 50  # what was given up is not held either: an outage's memory is bounded
        mosquitto.start()
        assert writer.wait_connected(20) and reader.wait_connected(20)
        wait_for(lambda: {m for m in got if m.startswith(b"down-")} == {b"down-%d" % i for i in range(50)}, 20,
                 "the 50 messages kept while the broker was down")
        for i in range(3000):  # connected: a burst far past the bound loses nothing
            writer.publish("q/t", b"up-%d" % i)
        expected = {b"up-%d" % i for i in range(3000)}
        wait_for(lambda: {m for m in got if m.startswith(b"up-")} == expected, 60, "all 3,000 messages of the burst")
        assert writer.messages_dropped == 30
    finally:
        writer.stop()
        reader.stop()
