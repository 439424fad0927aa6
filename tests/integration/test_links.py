"""MQTT links release everything they hold when stopped."""

from __future__ import annotations

import os
import time

import pytest

from fedge.mqtt import MqttLink
from fedge.transport import Inbound
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


@pytest.mark.parametrize("driver", ["paho", "loop"])
def test_a_refused_subscription_is_said_and_asked_for_again_until_granted(nats_factory, monkeypatch, caplog, driver):
    # A broker may refuse a subscription in its SUBACK (0x80): its permissions,
    # or NATS's MQTT gateway failing to create the JetStream consumer under
    # load. A link that took no notice stayed deaf to that topic for good,
    # silently. Here NATS refuses a QoS 1 subscription that would take a
    # session's unacknowledged messages past 65,535 (``max_ack_pending`` a
    # subscription): the second of two, until the first is given up.
    from fedge import mqtt
    from fedge.mqtt_loop import MqttLoop
    from tests.integration.support import wait_for

    monkeypatch.setattr(mqtt, "SUBSCRIBE_RETRY_S", (0.2, 0.4))
    nats = nats_factory("", mqtt="max_ack_pending: 40000")
    admin = MqttLink(broker_settings(nats.url), "admin", lambda ev: None, persistent=False)
    admin.start()
    assert admin.wait_connected(20)
    admin.publish("t/second", b"retained", retain=True).wait_for_publish(20)
    admin.stop()
    got: list[str] = []
    loop = MqttLoop() if driver == "loop" else None
    if loop is not None:
        loop.start()
    link = MqttLink(broker_settings(nats.url), "dev", lambda ev: got.append(ev.topic) if isinstance(ev, Inbound)
                    else None, subscriptions=["t/first", "t/second"], persistent=False, loop=loop)
    try:
        with caplog.at_level("WARNING", logger="fedge.mqtt"):
            link.start()
            wait_for(lambda: link.subscribe_refused >= 3, 20, "the refusal to be seen, and asked again")
        assert "t/second" not in got
        said = [r.getMessage() for r in caplog.records if "refused the subscription to t/second" in r.getMessage()]
        assert said and "ACL" in said[0]
        assert len(said) < link.subscribe_refused  # one line for a streak, not one per refusal
        link.unsubscribe("t/first")  # room for the second: the next time it is asked for, it is granted
        wait_for(lambda: "t/second" in got, 20, "the retained message once the subscription is granted")
        refused = link.subscribe_refused
        time.sleep(1.0)
        assert link.subscribe_refused == refused  # granted: not asked for again
    finally:
        link.stop()
        if loop is not None:
            loop.close()


@pytest.mark.parametrize("driver", ["paho", "loop"])
def test_a_link_fails_over_to_the_next_broker_node_and_back_when_one_cannot_be_reached(mosquitto_factory, driver):
    # A clustered broker (broker.failover_urls): a node that is down is
    # skipped for the next, and a link whose node goes down moves on.
    from fedge.mqtt_loop import MqttLoop
    from tests.conftest import free_port
    from tests.integration.support import wait_for

    first, second = mosquitto_factory(name="node-a"), mosquitto_factory(name="node-b")
    dead = f"mqtt://127.0.0.1:{free_port()}"
    loop = MqttLoop(name="failover") if driver == "loop" else None
    settings = broker_settings(dead, failover_urls=[first.url, second.url])
    link = MqttLink(settings, "roamer", lambda ev: None, persistent=False, loop=loop)
    try:
        link.start()
        assert link.wait_connected(20), "no node reached"
        assert link.address == f"127.0.0.1:{first.port}" and link.connect_failures >= 1
        first.kill()
        wait_for(lambda: link.connected.is_set() and link.address == f"127.0.0.1:{second.port}", 30,
                 "the link on the second node")
    finally:
        link.stop()
        if loop is not None:
            loop.close()


def test_failover_urls_must_be_broker_addresses_of_the_same_scheme():
    from fedge.config import BrokerSettings, ConfigError

    for bad in (["http://x:1"], ["mqtts://x:8883"], [3]):
        with pytest.raises(ConfigError, match=r"broker\.failover_urls"):
            BrokerSettings(url="mqtt://a:1883", failover_urls=bad).check()
    BrokerSettings(url="mqtt://a:1883", failover_urls=["mqtt://b:1883", "tcp://c"]).check()
