"""Many MqttLinks on one MqttLoop against a real Mosquitto: a thousand
connections in one process, a broker restart, descriptors given back, the
descriptor limit, TLS, and the link's own behaviours (outage lines, the
packet limit a 3.1.1 broker does not announce) driven by the loop."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from fedge.mqtt import Inbound, LinkDown, LinkUp, MqttLink
from fedge.mqtt_loop import MqttLoop, Shaping
from tests.conftest import REPO, free_port
from tests.integration.support import broker_settings, wait_for

pytestmark = pytest.mark.integration


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def loop():
    lp = MqttLoop()
    yield lp
    lp.close(timeout=2)


class Fleet:
    """``n`` links on ``loop``, link i subscribed to ``own/i``, counting
    what each hears (events with the time they came) and its SUBACKs."""

    def __init__(self, loop: MqttLoop, url: str, n: int, prefix: str, **settings) -> None:
        self.lock = threading.Lock()
        self.events: list[list[tuple[float, object]]] = [[] for _ in range(n)]
        self.subacks = [0] * n
        self.links = []
        for i in range(n):
            link = MqttLink(broker_settings(url, **settings), f"{prefix}-{i}", self._sink(i),
                            subscriptions=[f"own/{i}"], persistent=False, loop=loop)
            link.client.on_subscribe = self._suback(i)
            self.links.append(link)

    def _sink(self, i: int):
        def put(ev: object) -> None:
            with self.lock:
                self.events[i].append((time.monotonic(), ev))
        return put

    def _suback(self, i: int):
        def count(*args: object) -> None:
            with self.lock:
                self.subacks[i] += 1
        return count

    def of(self, i: int, kind: type) -> list[tuple[float, object]]:
        with self.lock:
            return [(t, ev) for t, ev in self.events[i] if isinstance(ev, kind)]

    def all(self, pred) -> bool:
        return all(pred(i) for i in range(len(self.links)))

    def start(self) -> None:
        for link in self.links:
            link.start()

    def stop(self) -> None:
        for link in self.links:
            link.stop(timeout=2)


def test_a_thousand_links_on_one_loop_each_get_their_own_message(mosquitto, loop):
    n = 1000
    fleet = Fleet(loop, mosquitto.url, n, "k")
    before_threads = threading.active_count()
    start = time.monotonic()
    fleet.start()
    try:
        wait_for(lambda: all(link.connected.is_set() for link in fleet.links), 30, "every link connected")
        connected_s = time.monotonic() - start
        assert threading.active_count() <= before_threads + 1  # one thread for all
        wait_for(lambda: fleet.all(lambda i: fleet.subacks[i] == 1), 30, "every subscription acknowledged")
        sender = fleet.links[0]  # one link publishes to all the others' topics
        for i in range(n):
            sender.publish(f"own/{i}", b"for %d" % i)
        wait_for(lambda: fleet.all(lambda i: fleet.of(i, Inbound)), 30, "every link's message")
        for i in range(n):
            [(_, msg)] = fleet.of(i, Inbound)
            assert msg.payload == b"for %d" % i
            assert len(fleet.of(i, LinkUp)) == 1 and not fleet.of(i, LinkDown)
        assert loop.attempts == n  # no retries
        print(f"\n{n} links connected in {connected_s:.2f} s")
    finally:
        fleet.stop()
    assert len(loop) == 0


def test_after_a_broker_restart_every_link_comes_back_after_its_backoff(mosquitto, loop):
    n = 300
    fleet = Fleet(loop, mosquitto.url, n, "r")  # reconnect_min_s=1, reconnect_max_s=2
    fleet.start()
    try:
        wait_for(lambda: all(link.connected.is_set() for link in fleet.links), 20, "every link connected")
        mosquitto.restart()
        wait_for(lambda: fleet.all(lambda i: len(fleet.of(i, LinkUp)) == 2), 25, "every link back")
        for i in range(n):
            [(down, ev)] = fleet.of(i, LinkDown)
            assert ev.link == f"r-{i}"
            up = fleet.of(i, LinkUp)[1][0]
            assert up - down >= 1.0 - 0.05  # not before reconnect_min_s (from the close, just before LinkDown)
        # and each resubscribed: a message reaches every one
        wait_for(lambda: fleet.all(lambda i: fleet.subacks[i] == 2), 20, "every subscription made again")
        for i in range(n):
            fleet.links[(i + 1) % n].publish(f"own/{i}", b"again")
        wait_for(lambda: fleet.all(lambda i: fleet.of(i, Inbound)), 20, "every link's message after the restart")
    finally:
        fleet.stop()


def test_stopped_links_and_a_closed_loop_leave_no_descriptors_behind(mosquitto):
    settings = broker_settings(mosquitto.url)

    def cycle(n: int) -> None:
        lp = MqttLoop()
        links = [MqttLink(settings, f"leak-{i}", lambda ev: None, persistent=False, loop=lp) for i in range(n)]
        for link in links:
            link.start()
        for link in links:
            assert link.wait_connected(10), "link did not connect"
        assert open_descriptors() >= n  # one each while connected
        for link in links:
            link.stop()
        lp.close()

    cycle(5)  # warm up whatever paho and the resolver cache
    before = open_descriptors()
    cycle(200)
    assert open_descriptors() - before <= 2
    # a link stopped while its broker is away, between attempts, holds nothing either
    lp = MqttLoop()
    mosquitto.stop()
    links = [MqttLink(settings, f"away-{i}", lambda ev: None, persistent=False, loop=lp) for i in range(50)]
    for link in links:
        link.start()
    wait_for(lambda: all(link.connect_failures for link in links), 10, "a failed attempt each")
    for link in links:
        link.stop()
    lp.close()
    assert open_descriptors() - before <= 2


def test_too_low_a_descriptor_limit_is_one_line_naming_ulimit(mosquitto):
    # A process whose hard limit is 256: the soft one is raised to it, which is
    # not enough for 1,000 links; links started one by one fail at the limit.
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 256))
from fedge.mqtt import MqttLink
from fedge.mqtt_loop import DescriptorLimitError, MqttLoop
from tests.integration.support import broker_settings
loop = MqttLoop()
try:
    loop.reserve(1000)
except DescriptorLimitError as exc:
    print("reserve:", exc)
print("soft limit now", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
links = []
try:
    for i in range(1000):
        link = MqttLink(broker_settings("{mosquitto.url}"), f"fd-{{i}}", lambda ev: None, persistent=False, loop=loop)
        link.start()
        links.append(link)
except DescriptorLimitError as exc:
    print("started", len(links), "then:", exc)
for link in links:
    link.stop(timeout=1)
loop.close()
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("reserve: 1000 MQTT connections need 1064 open files but this process may open only 256: "
                        "raise the limit with `ulimit -n 1064` in the shell that starts it (LimitNOFILE=1064 in a "
                        "systemd unit)"), lines
    assert lines[1] == "soft limit now 256"
    assert lines[2].startswith("started 192 then: 193 MQTT connections need 257 open files"), lines
    assert "`ulimit -n 257`" in lines[2]


def test_tls_links_on_the_loop_connect_talk_and_name_an_untrusted_certificate(mosquitto_factory, tmp_path, loop):
    from tests.integration.test_security import make_pki

    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    broker = mosquitto_factory(extra=f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\n"
                                     f"keyfile {pki / 'server.key'}\n", tls=True)
    got: list[object] = []
    # one plain, one over a slow and distant network: both go through the TLS handshake on the loop
    links = [MqttLink(broker_settings(broker.url, ca_file=str(pki / "ca.crt")), f"tls-{i}", got.append,
                      subscriptions=[f"tls/{i}"], persistent=False, loop=loop, shaping=shaping)
             for i, shaping in enumerate([None, Shaping(up_bytes_s=50_000, down_bytes_s=50_000, delay_s=0.1)])]
    for link in links:
        link.client.on_subscribe = lambda *a: got.append("suback")
        link.start()
    try:
        assert all(link.wait_connected(10) for link in links)
        wait_for(lambda: got.count("suback") == 2, 10, "both subscriptions")
        payload = os.urandom(30_000)
        links[0].publish("tls/1", payload)
        links[1].publish("tls/0", b"back")
        wait_for(lambda: len([e for e in got if isinstance(e, Inbound)]) == 2, 15, "both messages")
        assert {(e.topic, e.payload) for e in got if isinstance(e, Inbound)} == {("tls/1", payload), ("tls/0", b"back")}
    finally:
        for link in links:
            link.stop()

    other = tmp_path / "other"
    other.mkdir()
    make_pki(other)
    stranger = MqttLink(broker_settings(broker.url, ca_file=str(other / "ca.crt")), "stranger", lambda ev: None,
                        persistent=False, loop=loop, report_outages=False)
    stranger.start()
    try:
        wait_for(lambda: stranger.connect_failures >= 1, 10, "a failed attempt")
        assert "TLS certificate is not trusted" in stranger.last_error, stranger.last_error
        assert not stranger.connected.is_set()
    finally:
        stranger.stop()


def test_an_unreachable_broker_is_said_once_for_all_the_loops_links(caplog, loop):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    url = f"mqtt://127.0.0.1:{free_port()}"
    links = [MqttLink(broker_settings(url), f"gone-{i}", lambda ev: None, persistent=False, loop=loop)
             for i in range(20)]
    for link in links:
        link.start()
    try:
        wait_for(lambda: all(link.connect_failures >= 2 for link in links), 15, "every link retrying")
        lines = [r.getMessage() for r in caplog.records if "cannot reach the broker" in r.getMessage()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"cannot reach the broker at {url} (20 of 20 links of this process), retrying: "
                                   "connection refused"), lines[0]
    finally:
        for link in links:
            link.stop()


def test_a_mqtt311_link_on_the_loop_learns_the_brokers_packet_limit(mosquitto_factory, loop):
    from tests.integration.test_packet_limit import BROKER_LIMIT, CONFIGURED, Receiver, chunked_topic, downs

    broker = mosquitto_factory(extra=f"max_packet_size {BROKER_LIMIT}\n")
    rx = Receiver(broker.url)
    rx.link.start()
    events: list[object] = []
    tx = MqttLink(broker_settings(broker.url, protocol="3.1.1", max_packet_bytes=CONFIGURED), "tx-loop",
                  events.append, persistent=False, loop=loop)
    tx.start()
    try:
        assert rx.link.wait_connected(10) and tx.wait_connected(10)
        message = os.urandom(100_000)
        tx.publish_chunked(chunked_topic("loop"), message)
        wait_for(lambda: rx.got("loop", message), 25, "the message, whole, after the link learned the limit")
        assert 2 <= len(downs(events)) <= 8
        assert tx.max_packet_bytes <= BROKER_LIMIT
    finally:
        tx.stop()
        rx.link.stop()


def test_mqtt5_links_on_the_loop_and_the_queue_bound_while_the_broker_is_away(mosquitto, loop):
    got: list[bytes] = []
    reader = MqttLink(broker_settings(mosquitto.url, protocol="5"), "q5-reader",
                      lambda ev: got.append(ev.payload) if isinstance(ev, Inbound) else None,
                      subscriptions=["q5/t"], persistent=True, loop=loop)
    reader.start()
    assert reader.wait_connected(10)
    mosquitto.stop()
    writer = MqttLink(broker_settings(mosquitto.url, protocol="5", max_queued_messages=20), "q5-writer",
                      lambda ev: None, persistent=False, loop=loop)
    writer.start()
    try:
        for i in range(30):
            writer.publish("q5/t", b"down-%d" % i)
        assert writer.messages_dropped == 10
        mosquitto.start()
        assert writer.wait_connected(20) and reader.wait_connected(20)
        wait_for(lambda: sorted(got) == sorted(b"down-%d" % i for i in range(20)), 20, "the 20 messages kept")
    finally:
        writer.stop()
        reader.stop()
