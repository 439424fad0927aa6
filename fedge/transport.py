"""The transport the role shells talk to: an interface, its events, and an
in-memory implementation for fast tests of the shells.

``Link`` is what a shell needs from a connection to the broker: start and
stop it, publish (plain, chunked, retained, clearing a retained topic),
subscribe and unsubscribe, and count the payload bytes it moved. Whatever it
hears arrives as ``LinkEvent``s on the sink the shell gave it, on the link's
own thread. ``fedge.mqtt.MqttLink`` is the real one; a shell is built with a
``LinkFactory`` (``MqttLink`` by default) so that tests can give it
``MemoryBroker.link`` instead.

``MemoryBroker`` is a small broker in one process with what the shells rely
on: retained messages (an empty retained payload clears the topic), ``+``
and ``#`` wildcard subscriptions, persistent sessions (QoS 1 messages for
an offline client are queued and delivered when it reconnects), last wills
(``crash`` drops a client as a lost connection would, and publishes its
will) and, when asked, QoS 1 redelivery (every message delivered twice).
Delivery is synchronous: ``publish`` returns after every subscriber's sink
has been called, so a test needs no sleeps. The integration tests against a
real Mosquitto stay for what only a real broker shows (TLS, ACLs, packet
limits, restarts).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedge import chunks


@dataclass(frozen=True)
class LinkUp:
    link: str
    session_present: bool


@dataclass(frozen=True)
class LinkDown:
    link: str
    reason: str


@dataclass(frozen=True)
class Inbound:
    link: str
    topic: str
    payload: bytes
    retain: bool


LinkEvent = LinkUp | LinkDown | Inbound
Sink = Callable[[LinkEvent], None]


class Link(Protocol):
    """One connection to the broker, as the shells use it (QoS 1, but for
    subscriptions ``qos_of`` says need less)."""

    name: str
    address: str  # host:port, for log lines
    bytes_out: int  # payload bytes published
    bytes_in: int  # payload bytes received
    connected: threading.Event  # set while connected
    down_since: float | None  # monotonic time since which it has been without a connection; None while connected
    connect_failures: int  # connection attempts that failed
    messages_dropped: int  # given up: the queue kept while disconnected was full
    qos_of: Callable[[str], int]  # the QoS each subscription asks for (a memory broker has one kind)

    @property
    def max_packet_bytes(self) -> int:
        """The largest packet the link sends: ``broker.max_packet_bytes``, or
        the broker's own limit once the link learned it, if lower."""
        ...

    def start(self) -> None: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly, first publishing ``final`` (topic, payload) retained."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any: ...

    def publish_chunked(self, topic_for: Callable[[int], str], message: bytes, *, retain: bool = False) -> list[Any]:
        """``message`` as chunks, chunk i to ``topic_for(i)``; one entry per chunk."""

    def clear_retained(self, topic: str) -> None: ...

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


class LinkFactory(Protocol):
    """How a shell makes its links: ``MqttLink``'s constructor, or ``MemoryBroker.link``."""

    def __call__(self, settings: Any, client_id: str, sink: Sink, *, subscriptions: Iterable[str] = (),
                 will: tuple[str, bytes] | None = None, persistent: bool = True, name: str | None = None) -> Link: ...


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching: ``+`` one level, ``#`` the rest."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


@dataclass
class _Session:
    subscriptions: list[str] = field(default_factory=list)
    queued: list[tuple[str, bytes]] = field(default_factory=list)
    link: MemoryLink | None = None  # connected link, if any


class MemoryBroker:
    """An MQTT broker in one process, for tests of the shells (see the module
    docstring for what it does and does not do)."""

    def __init__(self, *, duplicates: bool = False, max_packet_bytes: int = 256 * 1024) -> None:
        self.duplicates = duplicates
        self.max_packet_bytes = max_packet_bytes
        self.retained: dict[str, bytes] = {}
        self.sessions: dict[str, _Session] = {}
        self.published: list[tuple[str, str, bytes, bool]] = []  # (client, topic, payload, retain), in order
        self.delivered: list[tuple[str, str, bool]] = []  # (client, topic, retain), in order
        self._lock = threading.RLock()

    def link(self, settings: Any, client_id: str, sink: Sink, *, subscriptions: Iterable[str] = (),
             will: tuple[str, bytes] | None = None, persistent: bool = True, name: str | None = None) -> MemoryLink:
        """A ``LinkFactory``: the shell calls it as it would call ``MqttLink``."""
        return MemoryLink(self, client_id, sink, list(subscriptions), will, persistent, name or client_id)

    # --- what links call -------------------------------------------------------------

    def connect(self, link: MemoryLink) -> bool:
        with self._lock:
            old = self.sessions.get(link.client_id)
            present = old is not None and link.persistent
            session = old if present and old is not None else _Session()
            self.sessions[link.client_id] = session
            if old is not None and old.link is not None and old.link is not link:
                old.link.dropped("session taken over")
            session.link = link
            for topic in link.subscriptions:
                if topic not in session.subscriptions:
                    session.subscriptions.append(topic)
            queued, session.queued = session.queued, []
        link.sink(LinkUp(link.name, present))
        for topic, payload in queued:
            link.deliver(topic, payload, False)
        # Like MQTT's re-subscription on connect: retained messages come again
        # for what this link subscribes, not for what an earlier process of the
        # same client left in the session.
        for topic in list(link.subscriptions):
            self._send_retained(link, topic)
        return present

    def disconnect(self, link: MemoryLink, *, publish_will: bool) -> None:
        with self._lock:
            session = self.sessions.get(link.client_id)
            if session is not None and session.link is link:
                session.link = None
                if not link.persistent:
                    del self.sessions[link.client_id]
        if publish_will and link.will is not None:
            self.publish(link.client_id, link.will[0], link.will[1], retain=True)

    def subscribe(self, link: MemoryLink, topic: str) -> None:
        with self._lock:
            session = self.sessions[link.client_id]
            if topic not in session.subscriptions:
                session.subscriptions.append(topic)
        self._send_retained(link, topic)

    def unsubscribe(self, link: MemoryLink, topic: str) -> None:
        with self._lock:
            session = self.sessions.get(link.client_id)
            if session is not None and topic in session.subscriptions:
                session.subscriptions.remove(topic)

    def publish(self, client_id: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to a wildcard topic {topic!r}")
        with self._lock:
            self.published.append((client_id, topic, payload, retain))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            targets: list[MemoryLink] = []
            for session in self.sessions.values():
                if not any(topic_matches(f, topic) for f in session.subscriptions):
                    continue
                if session.link is None:
                    session.queued.append((topic, payload))
                else:
                    targets.append(session.link)
        for link in targets:
            for _ in range(2 if self.duplicates else 1):
                link.deliver(topic, payload, False)

    # --- what tests call ---------------------------------------------------------------

    def crash(self, client_id: str) -> None:
        """Drop a client as a lost connection would: its last will is published."""
        with self._lock:
            session = self.sessions.get(client_id)
            link = session.link if session else None
        if link is not None:
            link.dropped("connection lost")
            self.disconnect(link, publish_will=True)

    def _send_retained(self, link: MemoryLink, pattern: str) -> None:
        with self._lock:
            matches = sorted((t, p) for t, p in self.retained.items() if topic_matches(pattern, t))
        for topic, payload in matches:
            link.deliver(topic, payload, True)


class MemoryLink:
    """A ``Link`` to a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, client_id: str, sink: Sink, subscriptions: list[str],
                 will: tuple[str, bytes] | None, persistent: bool, name: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.sink = sink
        self.subscriptions = subscriptions
        self.will = will
        self.persistent = persistent
        self.name = name
        self.address = "memory"
        self.bytes_out = 0
        self.bytes_in = 0
        self.max_packet_bytes = broker.max_packet_bytes
        self.chunk_bytes = chunks.chunk_data_size(broker.max_packet_bytes)
        self.connected = threading.Event()
        self.down_since: float | None = None
        self.connect_failures = 0  # a memory broker never refuses
        self.messages_dropped = 0  # nor gives up messages
        self.qos_of: Callable[[str], int] = lambda topic: 1  # delivers every subscription alike

    def start(self) -> None:
        self.connected.set()
        self.down_since = None
        self.broker.connect(self)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        if not self.connected.is_set():
            return
        if final is not None:
            self.publish(final[0], final[1], retain=True)
        self.connected.clear()
        self.broker.disconnect(self, publish_will=False)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.bytes_out += len(payload)
        self.broker.publish(self.client_id, topic, payload, retain=retain)

    def publish_chunked(self, topic_for: Callable[[int], str], message: bytes, *, retain: bool = False
                        ) -> list[str]:
        topics = []
        for i, part in enumerate(chunks.split(message, self.chunk_bytes)):
            topics.append(topic_for(i))
            self.publish(topics[-1], part, retain=retain)
        return topics

    def clear_retained(self, topic: str) -> None:
        self.broker.publish(self.client_id, topic, b"", retain=True)

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        if self.connected.is_set():
            self.broker.subscribe(self, topic)

    def unsubscribe(self, topic: str) -> None:
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
        self.broker.unsubscribe(self, topic)

    # --- from the broker --------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes, retain: bool) -> None:
        self.broker.delivered.append((self.client_id, topic, retain))
        self.bytes_in += len(payload)
        self.sink(Inbound(self.name, topic, payload, retain))

    def dropped(self, reason: str) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self.down_since = time.monotonic()
            self.sink(LinkDown(self.name, reason))
