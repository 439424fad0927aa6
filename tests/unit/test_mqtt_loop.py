"""MqttLoop: many MqttLinks on one thread, against a small MQTT 3.1.1 broker
in this process (connect, subscribe, QoS 0/1 publish, ping, and what a
test does to it: drop every connection, stop listening, send a client a
large message). Timings are asserted as lower bounds the shaping and the
backoff guarantee, with generous upper bounds; every wait is for a
condition, with a timeout."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from fedge.config import BrokerSettings
from fedge.mqtt import Inbound, LinkDown, LinkUp, MqttLink
from fedge.mqtt_loop import DESCRIPTOR_MARGIN, DescriptorLimitError, MqttLoop, Shaping, TokenBucket, ensure_descriptors


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- a small broker --------------------------------------------------------------------


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_packet(topic: str, payload: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + payload
    return b"\x30" + _remaining(len(body)) + body


class _Client:
    def __init__(self, broker: FakeBroker, sock: socket.socket) -> None:
        self.broker = broker
        self.sock = sock
        self.client_id = ""
        self.topics: set[str] = set()
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def serve(self) -> None:
        b = self.broker
        try:
            while True:
                head = self.read_exact(1)[0]
                length, mult = 0, 1
                while True:
                    byte = self.read_exact(1)[0]
                    length += (byte & 127) * mult
                    mult *= 128
                    if not byte & 128:
                        break
                body = self.read_exact(length)
                kind = head & 0xF0
                if kind == 0x10:  # CONNECT: protocol name, level, flags, keepalive, client id
                    name_len = struct.unpack("!H", body[:2])[0]
                    pos = 2 + name_len + 4
                    id_len = struct.unpack("!H", body[pos:pos + 2])[0]
                    self.client_id = body[pos + 2:pos + 2 + id_len].decode()
                    with b.lock:
                        b.connects.append((time.monotonic(), self.client_id))
                    self.send(b"\x20\x02\x00\x00")
                elif kind == 0x80:  # SUBSCRIBE
                    mid, pos, granted = body[:2], 2, b""
                    while pos < len(body):
                        n = struct.unpack("!H", body[pos:pos + 2])[0]
                        self.topics.add(body[pos + 2:pos + 2 + n].decode())
                        pos += 2 + n + 1
                        granted += b"\x01"
                    self.send(b"\x90" + _remaining(2 + len(granted)) + mid + granted)
                elif kind == 0x30:  # PUBLISH
                    n = struct.unpack("!H", body[:2])[0]
                    topic = body[2:2 + n].decode()
                    pos = 2 + n
                    if (head >> 1) & 3:
                        self.send(b"\x40\x02" + body[pos:pos + 2])
                        pos += 2
                    payload = body[pos:]
                    with b.lock:
                        b.published.append((time.monotonic(), self.client_id, topic, payload))
                        targets = [c for c in b.clients if topic in c.topics]
                    for c in targets:
                        c.send(_publish_packet(topic, payload))
                elif kind == 0xC0:  # PINGREQ
                    with b.lock:
                        b.pings += 1
                    self.send(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    with b.lock:
                        b.disconnects += 1
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            with b.lock:
                if self in b.clients:
                    b.clients.remove(self)
            self.sock.close()


class FakeBroker:
    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.clients: list[_Client] = []
        self.connects: list[tuple[float, str]] = []
        self.published: list[tuple[float, str, str, bytes]] = []
        self.pings = 0
        self.disconnects = 0
        self.listener: socket.socket | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self.port = ls.getsockname()[1]
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                sock, _ = ls.accept()
            except OSError:
                return
            c = _Client(self, sock)
            with self.lock:
                self.clients.append(c)
            threading.Thread(target=c.serve, daemon=True).start()

    def stop_listening(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which holds the socket
            self.listener.close()
            self.listener = None

    def drop_all(self) -> None:
        with self.lock:
            clients = list(self.clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)

    def send_to(self, client_id: str, topic: str, payload: bytes) -> None:
        with self.lock:
            [c] = [c for c in self.clients if c.client_id == client_id]
        c.send(_publish_packet(topic, payload))

    def close(self) -> None:
        self.stop_listening()
        self.drop_all()


@pytest.fixture
def broker():
    b = FakeBroker()
    yield b
    b.close()


@pytest.fixture
def loop():
    lp = MqttLoop(jitter=0.0)
    yield lp
    lp.close(timeout=2)


def settings(url: str, **kw) -> BrokerSettings:
    kw = {"reconnect_min_s": 0.3, "reconnect_max_s": 0.6, "keepalive_s": 10, **kw}
    return BrokerSettings(url=url, **kw)


class Events:
    """A sink that keeps every event with the time it arrived."""

    def __init__(self) -> None:
        self.items: list[tuple[float, object]] = []
        self.lock = threading.Lock()

    def __call__(self, ev: object) -> None:
        with self.lock:
            self.items.append((time.monotonic(), ev))

    def of(self, kind: type) -> list:
        with self.lock:
            return [ev for _, ev in self.items if isinstance(ev, kind)]

    def times(self, kind: type) -> list[float]:
        with self.lock:
            return [t for t, ev in self.items if isinstance(ev, kind)]


def subscribed(broker: FakeBroker, client_id: str, topic: str) -> bool:
    with broker.lock:
        return any(c.client_id == client_id and topic in c.topics for c in broker.clients)


# --- the pieces ------------------------------------------------------------------------


def test_a_token_bucket_starts_full_refills_at_its_rate_and_caps_at_its_burst():
    b = TokenBucket(1000, burst=500, now=0.0)
    assert b.available(0.0) == 500
    b.take(500)
    assert b.available(0.1) == 100
    assert b.ready_at(0.1) == pytest.approx(0.5)  # MIN_GRANT = 500 here: the whole burst
    assert b.available(10.0) == 500  # never more than the burst
    assert TokenBucket(100_000).burst == 5000  # default: 50 ms of the rate
    assert TokenBucket(1000).burst == 1024  # at least 1 KiB
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_the_descriptor_limit_is_raised_to_the_hard_limit_when_needed(monkeypatch):
    import resource

    limits = {"now": (1024, 20000)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.__setitem__("now", value))
    assert ensure_descriptors(500) == 1024 and limits["now"] == (1024, 20000)  # enough already: untouched
    assert ensure_descriptors(10_000) == 20000 and limits["now"] == (20000, 20000)


def test_too_few_descriptors_is_one_line_naming_ulimit_and_the_number_needed(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: None)  # the raise does not take
    with pytest.raises(DescriptorLimitError) as err:
        ensure_descriptors(10_000)
    message = str(err.value)
    assert "\n" not in message
    assert f"ulimit -n {10_000 + DESCRIPTOR_MARGIN}" in message and "only 1024" in message
    loop = MqttLoop()
    try:
        with pytest.raises(DescriptorLimitError):
            loop.reserve(10_000)
    finally:
        loop.close()


# --- links on a loop ---------------------------------------------------------------------


def test_links_on_one_loop_connect_subscribe_publish_and_receive(broker, loop):
    before = set(threading.enumerate())  # (a thread another test left behind is not this test's)
    events = [Events() for _ in range(20)]
    links = [MqttLink(settings(broker.url), f"dev-{i}", events[i], subscriptions=[f"to/{i}"], persistent=False,
                      loop=loop) for i in range(20)]
    for link in links:
        link.start()
    for link in links:
        assert link.wait_connected(10)
    names = [t.name for t in threading.enumerate()]
    started = [t.name for t in set(threading.enumerate()) - before]
    assert names.count(loop.name) == 1 and not [n for n in started if n.startswith("paho")]  # no thread per link
    wait_for(lambda: all(subscribed(broker, f"dev-{i}", f"to/{i}") for i in range(20)), 10, "every subscription")
    for i, link in enumerate(links):  # from this thread: the loop is woken to send
        link.publish(f"to/{(i + 1) % 20}", b"from %d" % i)
    for i in range(20):
        wait_for(lambda i=i: events[i].of(Inbound), 10, f"dev-{i}'s message")
        [msg] = events[i].of(Inbound)
        assert (msg.topic, msg.payload) == (f"to/{i}", b"from %d" % ((i - 1) % 20))
        assert [type(e) for e in events[i].of(LinkUp)] == [LinkUp]
    assert len(loop) == 20
    for link in links:
        link.stop()
    assert len(loop) == 0
    wait_for(lambda: broker.disconnects == 20, 5, "a DISCONNECT from every link")


def test_a_dropped_connection_comes_back_after_the_shortest_backoff(broker, loop):
    ev = Events()
    link = MqttLink(settings(broker.url), "dropped", ev, subscriptions=["t"], persistent=False, loop=loop)
    link.start()
    try:
        assert link.wait_connected(5)
        for round_ in range(2):  # each drop waits reconnect_min_s, not a doubled delay
            broker.drop_all()
            wait_for(lambda r=round_: len(ev.of(LinkUp)) == r + 2, 10, "the link back")
            down = ev.times(LinkDown)[-1]
            up = ev.times(LinkUp)[-1]
            # the backoff runs from the socket's close, just before LinkDown is put
            assert 0.3 - 0.05 <= up - down < 3.0, up - down
        assert len(ev.of(LinkDown)) == 2
        wait_for(lambda: subscribed(broker, "dropped", "t"), 5, "the subscription again")
        loop.drop(link)  # a simulated network failure: the same
        wait_for(lambda: len(ev.of(LinkUp)) == 4, 10, "the link back after drop()")
        assert loop.drops == 3
    finally:
        link.stop()


def test_a_suspended_link_stays_off_until_resumed_and_then_sends_what_it_queued(broker, loop):
    ev = Events()
    link = MqttLink(settings(broker.url, reconnect_min_s=0.05, reconnect_max_s=0.1), "napping", ev,
                    subscriptions=["t"], loop=loop)
    link.start()
    try:
        assert link.wait_connected(5)
        loop.suspend(link)
        wait_for(lambda: len(ev.of(LinkDown)) == 1, 5, "the link down")
        link.publish("out/napping", b"while away")  # queued, as in any outage
        time.sleep(0.5)  # ten times the backoff: a link that was not held off would be back
        assert len(ev.of(LinkUp)) == 1 and not link.connected.is_set()
        assert not any(p[2] == "out/napping" for p in broker.published)
        loop.resume(link)
        wait_for(lambda: len(ev.of(LinkUp)) == 2, 5, "the link back after resume()")
        wait_for(lambda: [p[3] for p in broker.published if p[2] == "out/napping"] == [b"while away"], 5,
                 "the queued message")
    finally:
        link.stop()


def test_an_unreachable_broker_is_retried_with_doubling_delays_and_the_failure_named(loop):
    broker = FakeBroker()
    broker.stop_listening()  # the port is free: connections are refused
    link = MqttLink(settings(broker.url, reconnect_min_s=0.2, reconnect_max_s=0.4), "lonely", lambda ev: None,
                    persistent=False, loop=loop)
    start = time.monotonic()
    link.start()
    try:
        wait_for(lambda: link.connect_failures >= 4, 10, "four failed attempts")
        # at once, then after 0.2, 0.4 (doubled) and 0.4 (capped)
        assert time.monotonic() - start >= 0.2 + 0.4 + 0.4 - 0.05
        assert link.last_error.startswith("connection refused by 127.0.0.1"), link.last_error
        assert not link.connected.is_set() and link.down_since is not None
        broker.start()
        assert link.wait_connected(5), "the link did not reach the broker once it listened"
    finally:
        link.stop()
        broker.close()


def test_keepalive_pings_are_sent_by_the_loop(broker, loop):
    link = MqttLink(settings(broker.url, keepalive_s=1), "pinger", lambda ev: None, persistent=False, loop=loop)
    link.start()
    try:
        assert link.wait_connected(5)
        wait_for(lambda: broker.pings >= 2, 10, "two PINGREQs")
        assert link.connected.is_set()
    finally:
        link.stop()


def test_a_sink_that_raises_breaks_only_its_own_connection(broker, loop):
    calm = Events()
    fails = {"n": 0}

    angry_events = Events()

    def angry(ev: object) -> None:
        angry_events(ev)
        if isinstance(ev, Inbound):
            fails["n"] += 1
            raise RuntimeError("a bug in the sink")

    links = [MqttLink(settings(broker.url), "angry", angry, subscriptions=["x"], persistent=False, loop=loop),
             MqttLink(settings(broker.url), "calm", calm, subscriptions=["x"], persistent=False, loop=loop)]
    for link in links:
        link.start()
    try:
        assert all(link.wait_connected(5) for link in links)
        wait_for(lambda: subscribed(broker, "angry", "x") and subscribed(broker, "calm", "x"), 5, "subscriptions")
        broker.send_to("angry", "x", b"boom")
        broker.send_to("calm", "x", b"fine")
        wait_for(lambda: calm.of(Inbound), 5, "the calm link's message")
        wait_for(lambda: fails["n"] == 1 and len([c for c in broker.connects if c[1] == "angry"]) == 2, 10,
                 "the angry link reconnecting")
        wait_for(lambda: len(angry_events.of(LinkUp)) == 2, 5, "the angry link's LinkUp again")
        assert len(angry_events.of(LinkDown)) == 1  # the connection it lost was said
        assert len(calm.of(LinkUp)) == 1 and not calm.of(LinkDown)  # untouched
    finally:
        for link in links:
            link.stop()


def test_stopping_links_while_they_connect_and_from_their_own_sink(broker, loop):
    # nothing listens: stop() during the backoff returns at once and holds nothing
    dead = FakeBroker()
    dead.stop_listening()
    before = open_descriptors()
    idle = MqttLink(settings(dead.url), "never", lambda ev: None, persistent=False, loop=loop)
    idle.start()
    wait_for(lambda: idle.connect_failures >= 1, 5, "a failed attempt")
    start = time.monotonic()
    idle.stop()
    assert time.monotonic() - start < 2
    assert open_descriptors() <= before
    dead.close()

    # a sink that stops its own link (on the loop's thread) does not hang the loop
    stopped = threading.Event()
    holder: list[MqttLink] = []

    def sink(ev: object) -> None:
        if isinstance(ev, Inbound):
            holder[0].stop()
            stopped.set()

    link = MqttLink(settings(broker.url), "self-stopper", sink, subscriptions=["bye"], persistent=False, loop=loop)
    holder.append(link)
    other = MqttLink(settings(broker.url), "bystander", lambda ev: None, persistent=False, loop=loop)
    link.start()
    other.start()
    assert link.wait_connected(5) and other.wait_connected(5)
    wait_for(lambda: subscribed(broker, "self-stopper", "bye"), 5, "the subscription")
    broker.send_to("self-stopper", "bye", b"now")
    assert stopped.wait(5)
    wait_for(lambda: broker.disconnects >= 1 and len(loop) == 1, 5, "the link gone")
    info = other.publish("still/here", b"1")  # the loop still serves the others
    info.wait_for_publish(5)
    assert info.is_published()
    other.stop()


# --- shaping -----------------------------------------------------------------------------


def test_the_uplink_rate_holds_back_what_paho_writes(broker, loop):
    shaping = Shaping(up_bytes_s=20_000, burst_bytes=1024)
    link = MqttLink(settings(broker.url), "slow-up", lambda ev: None, persistent=False, loop=loop, shaping=shaping)
    link.start()
    try:
        assert link.wait_connected(5)
        start = time.monotonic()
        info = link.publish("big", b"u" * 40_000)
        wait_for(lambda: any(p[2] == "big" for p in broker.published), 20, "the whole message at the broker")
        elapsed = time.monotonic() - start
        assert elapsed >= (40_000 - 1024 - 1000) / 20_000, elapsed  # less the burst, CONNECT's leftovers
        assert elapsed < 10
        info.wait_for_publish(5)
        [payload] = [p[3] for p in broker.published if p[2] == "big"]
        assert payload == b"u" * 40_000
    finally:
        link.stop()


def test_the_downlink_rate_holds_back_what_paho_reads(broker, loop):
    ev = Events()
    link = MqttLink(settings(broker.url), "slow-down", ev, subscriptions=["down"], persistent=False, loop=loop,
                    shaping=Shaping(down_bytes_s=20_000, burst_bytes=1024))
    link.start()
    try:
        assert link.wait_connected(5)
        wait_for(lambda: subscribed(broker, "slow-down", "down"), 5, "the subscription")
        start = time.monotonic()
        broker.send_to("slow-down", "down", b"d" * 40_000)
        wait_for(lambda: ev.of(Inbound), 20, "the message")
        elapsed = time.monotonic() - start
        assert elapsed >= (40_000 - 1024) / 20_000, elapsed
        assert ev.of(Inbound)[0].payload == b"d" * 40_000
        # a change of rate applies at once
        loop.shape(link, Shaping())
        start = time.monotonic()
        broker.send_to("slow-down", "down", b"e" * 40_000)
        wait_for(lambda: len(ev.of(Inbound)) == 2, 5, "the second message")
        assert time.monotonic() - start < 1.0
    finally:
        link.stop()


def test_a_delay_holds_back_each_way(broker, loop):
    link = MqttLink(settings(broker.url), "far", lambda ev: None, persistent=False, loop=loop,
                    shaping=Shaping(delay_s=0.25))
    start = time.monotonic()
    link.start()
    try:
        assert link.wait_connected(5)
        assert time.monotonic() - start >= 0.5  # CONNECT there, CONNACK back
        start = time.monotonic()
        info = link.publish("far/away", b"hello")
        info.wait_for_publish(5)
        assert info.is_published()
        assert 0.5 <= time.monotonic() - start < 3.0  # PUBLISH there, PUBACK back
    finally:
        link.stop()
    wait_for(lambda: broker.disconnects == 1, 5, "the DISCONNECT, sent at stop() without the delay")


def test_a_link_starts_again_after_stop_and_closing_the_loop_stops_its_links(broker):
    loop = MqttLoop(jitter=0.0)
    ev = Events()
    link = MqttLink(settings(broker.url), "again", ev, persistent=False, loop=loop)
    for _ in range(2):
        link.start()
        assert link.wait_connected(5)
        link.stop()
        assert not link.connected.is_set() and len(loop) == 0
    link.start()
    assert link.wait_connected(5)
    before = broker.disconnects
    loop.close(timeout=2)  # stops the links still on it, cleanly
    wait_for(lambda: broker.disconnects == before + 1, 5, "the last DISCONNECT")
    assert [type(e) for e in ev.of(LinkUp)] == [LinkUp] * 3
    assert not [t for t in threading.enumerate() if t.name == loop.name]
