"""The one place that talks to paho-mqtt.

``MqttLink`` is the real ``fedge.transport.Link``. It owns one paho client: connection (TCP or TLS, MQTT 3.1.1 or 5,
persistent session, last will), reconnects with capped exponential backoff,
re-subscription, and chunked publishing. It turns everything it hears into
small events put on a queue the role's own thread consumes; the protocol
cores never import this module.

Persistent sessions: the aggregator and agents connect with
``clean_session=False`` (3.1.1) or ``clean_start=False`` plus a session
expiry (5), so QoS 1 messages published while they were away are queued by
the broker and delivered when they come back. Outgoing QoS 1 messages are
queued by paho while disconnected and sent after reconnecting.

Broker packet limits: a broker drops the connection on a packet over its
limit, and paho would send the same packet again after every reconnect, for
ever. So the link learns the limit and keeps every packet within it
(``max_packet_bytes``). MQTT 5 brokers announce it in CONNACK (Maximum
Packet Size). A 3.1.1 broker just closes the socket, so two drops in a row
while the same publish, larger than any the broker ever acknowledged, is
outstanding are taken as that publish being too large: the limit is halved (never below what
chunking needs, nor below what is known to fit), which takes a few
reconnects at most. Messages the last connection left unacknowledged are
chunked again at the new size before paho sends them again; what cannot be
chunked (a plain ``publish``) is given up with an error line, and a plain
``publish`` over the known limit is refused up front. Every change of the
limit is logged once, naming ``broker.max_packet_bytes``.

An unreachable broker is never silent: paho retries a failed connection with
backoff but says nothing, so every link tells ``OUTAGES`` of each failed
attempt (why it failed: refused, a host name that does not resolve, TLS, a
CONNACK refusal) and of each connection, and that says once, a second
later, that the broker cannot be reached, again every minute while it
lasts, and once when it is reached again (see ``OutageReporter``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge import chunks
from fedge.config import BrokerSettings, ConfigError
from fedge.transport import Inbound, LinkDown, LinkEvent, LinkUp

if TYPE_CHECKING:
    from fedge.mqtt_loop import MqttLoop, Shaping

__all__ = [
    "MIN_PACKET_BYTES",
    "OUTAGES",
    "Inbound",
    "Inbox",
    "LinkDown",
    "LinkEvent",
    "LinkUp",
    "MqttLink",
    "OutageReporter",
    "describe_failure",
    "lowered_limit",
    "monotonic",
    "parse_url",
    "publish_packet_bytes",
]

log = logging.getLogger("fedge.mqtt")

# paho waits on its sockets with select(), which cannot watch a descriptor
# numbered 1024 or more, and every link holds three (its connection and a
# wake-up pair). One process therefore runs at most this many links running
# paho's own thread; links driven by a ``fedge.mqtt_loop.MqttLoop`` (epoll,
# one descriptor each) are not bound by it.
MAX_LINKS_PER_PROCESS = 300

# The smallest packet limit chunking works with (``chunks.chunk_data_size``).
MIN_PACKET_BYTES = chunks.MIN_CHUNK_DATA + chunks.PACKET_OVERHEAD + chunks.CHUNK_HEADER.size
# A dropped connection is never blamed on a publish this small: no broker
# fedge can work with refuses it (broker.max_packet_bytes is at least this),
# and a network blip, or a clustered broker's node failing over, must not
# cost a status message, a receipt or an update. Blamed, a small publish
# outstanding at two drops in a row (an update sent again for want of a
# receipt) took the limit below what chunking needs, and the device gave up
# every update from then on.
BLAMELESS_PACKET_BYTES = MIN_PACKET_BYTES
PACKET_TOO_LARGE = 0x95  # MQTT 5 reason code of a DISCONNECT
# A subscription the broker refused is asked for again after the first
# delay, doubled at each refusal in a row up to the second (plus up to a
# quarter, so that a fleet refused at once does not ask again at once).
SUBSCRIBE_RETRY_S = (2.0, 60.0)


def _jitter() -> float:
    return random.random()


def publish_packet_bytes(topic: str, payload_len: int, v5: bool) -> int:
    """Size of our QoS 1 PUBLISH packet, counted as MQTT 5's Maximum Packet
    Size counts it (the whole packet; we send no properties)."""
    remaining = 2 + len(topic.encode()) + 2 + payload_len + (1 if v5 else 0)
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def lowered_limit(limit: int, refused: int, fits: int) -> int:
    """The packet limit to keep to after the broker dropped the connection
    with a ``refused``-byte publish unacknowledged, ``fits`` being the largest
    publish it ever acknowledged (less than ``refused``).

    Halves, but never below what chunking needs or what is known to fit, so
    the result is always below ``refused`` and the next try is smaller. Once
    chunking cannot go lower, the limit stops just below ``refused``: that
    message and any like it are given up instead of sent again."""
    guess = max(min(limit, refused) // 2, fits, MIN_PACKET_BYTES)
    return guess if guess < refused else max(fits, refused - 1)


def _acked(info: paho.MQTTMessageInfo) -> bool:
    # paho leaves rc=MQTT_ERR_NO_CONN on a message queued while offline even
    # once it is delivered, and is_published() then raises; the flag is what
    # tells.
    return bool(getattr(info, "_published", False))


def _pending(info: paho.MQTTMessageInfo) -> bool:
    return not _acked(info) and info.rc != paho.MQTT_ERR_QUEUE_SIZE


def _take_queue(client: paho.Client) -> list[paho.MQTTMessage]:
    """Every QoS 1 message paho holds unacknowledged, removed from its queue."""
    take = getattr(client, "drop_out_messages", None)  # paho >= 2.2
    if take is not None:
        return list(take())
    with client._out_message_mutex:  # what drop_out_messages does, for paho 2.0 and 2.1
        out = list(client._out_messages.values())
        client._out_messages.clear()
    return out


@dataclass
class _Sent:
    """A message handed to paho and not yet acknowledged in full, kept so that
    it can be chunked again (or given up) when the broker's packet limit
    turns out lower than the one it was published for."""

    message: bytes  # the whole message: the payload, or what was chunked
    retain: bool
    topic_for: Callable[[int], str] | None  # chunk i's topic; None for a plain publish
    topics: list[str]
    sizes: list[int]  # each packet's size
    # paho's handle of each packet, filled in as they are handed over: the
    # connection may drop in the middle, and a packet without one yet counts
    # as unacknowledged.
    infos: list[paho.MQTTMessageInfo]

    def acked_sizes(self) -> list[int]:
        return [size for info, size in zip(self.infos, self.sizes, strict=False) if _acked(info)]

    def unacked_sizes(self) -> list[int]:
        infos = self.infos[:]
        return [size for k, size in enumerate(self.sizes) if k >= len(infos) or _pending(infos[k])]

    def settled(self) -> bool:
        """Acknowledged in full (or dropped by paho for a full queue)."""
        return not self.unacked_sizes()

    def layout_fits(self) -> bool:
        """Chunks go out and are taken in order, so once any chunk of a message
        was acknowledged the others (no larger but for the last, smaller
        one) fit as well, and its receivers already hold that layout."""
        return self.topic_for is not None and any(_acked(i) for i in self.infos)


def parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ConfigError(f"broker.url {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    tls = parts.scheme in ("mqtts", "ssl")
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def describe_failure(exc: BaseException, host: str, port: int, timeout: float) -> str:
    """Why a connection attempt failed, and what to do about it, for a log line."""
    if isinstance(exc, socket.gaierror):
        return f"host name {host} does not resolve ({exc.strerror}); check broker.url and this host's DNS"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {host}:{port}; start the broker, or correct the port in broker.url"
    if isinstance(exc, TimeoutError):
        return (f"no answer from {host}:{port} within {timeout:g} s; check the network, its firewalls, and the "
                "host in broker.url")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({exc.verify_message}); set broker.ca_file to the CA that "
                "signed it")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS failed ({exc.reason or exc}); check that the port speaks TLS (mqtts://) and broker.ca_file, "
                "cert_file and key_file")
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}; check the network and broker.url"
    return f"{exc}; check broker.url"


@dataclass(eq=False)
class _Broker:
    """What the links of this process to one broker URL report (``OutageReporter``)."""

    url: str
    links: set[MqttLink] = field(default_factory=set)
    # Links whose last attempt failed: link -> (why, log level).
    failing: dict[MqttLink, tuple[str, int]] = field(default_factory=dict)
    since: float = 0.0  # when the outage began: the earliest such link's down_since
    failed_at: float = 0.0  # the outage's first failed attempt
    error: str = ""  # the newest failure's
    said: float | None = None  # when a line about it was last logged; None: none yet


class OutageReporter:
    """One log line per outage of a broker, not one per link and retry.

    paho retries a failed connection by itself, with backoff, and says
    nothing; a role that waits for the broker would wait in silence. Each
    link reports every failed attempt (``failed``) and every connection
    (``reached``) here. While some link of a broker URL fails, this says so
    once (the URL and the error), ``grace_s`` after the first failure, then
    every ``period_s`` with how long it has lasted, and once when the last
    failing link connects. A blip that a retry mends within ``grace_s`` says
    nothing (the roles log a dropped connection themselves).

    Keyed by broker URL because a simulated fleet (``fedge fleet``, the demo)
    runs hundreds of links to one broker in one process: they share a line
    ("300 of 300 links"), and the grace lets links started one after another
    all try once before it is written. The lines come from a thread of the
    reporter's own, running only while some link fails, so that the period
    holds whatever paho's backoff (``broker.reconnect_max_s``) is.
    """

    def __init__(self, period_s: float = 60.0, grace_s: float = 1.0, tick_s: float = 0.25) -> None:
        self.period_s = period_s
        self.grace_s = grace_s
        self.tick_s = tick_s
        self._brokers: dict[str, _Broker] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def join(self, link: MqttLink) -> None:
        with self._lock:
            self._brokers.setdefault(link.settings.url, _Broker(link.settings.url)).links.add(link)

    def leave(self, link: MqttLink) -> None:
        """A stopped link: it no longer counts, and an outage only it had ends unsaid."""
        with self._lock:
            broker = self._brokers.get(link.settings.url)
            if broker is None:
                return
            broker.links.discard(link)
            broker.failing.pop(link, None)
            if not broker.failing:
                broker.said = None
            if not broker.links:
                del self._brokers[broker.url]

    def failed(self, link: MqttLink, error: str, level: int) -> None:
        """``link``'s connection attempt failed (called once per attempt)."""
        now = monotonic()
        with self._lock:
            broker = self._brokers.get(link.settings.url)
            if broker is None or link not in broker.links:
                return  # stopped meanwhile
            down_since = now if link.down_since is None else link.down_since
            if not broker.failing:
                broker.since, broker.failed_at = down_since, now
            broker.since = min(broker.since, down_since)
            broker.failing[link] = (error, level)
            broker.error = error
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedge-broker-outages", daemon=True)
                self._thread.start()

    def reached(self, link: MqttLink) -> None:
        """``link`` connected: the end of the outage once no link of its broker fails."""
        now = monotonic()
        with self._lock:
            broker = self._brokers.get(link.settings.url)
            if broker is None or broker.failing.pop(link, None) is None or broker.failing:
                return
            said, broker.said = broker.said, None
            lasted = now - broker.since
        if said is not None:
            log.info("reached the broker at %s after %.0f s", broker.url, lasted)

    def _run(self) -> None:
        while True:
            lines: list[tuple[int, str]] = []
            with self._lock:
                now = monotonic()
                active = [b for b in self._brokers.values() if b.failing]
                if not active:
                    self._thread = None
                    return
                for b in active:
                    if b.said is None and now - b.failed_at >= self.grace_s:
                        lines.append(self._line(b, now, first=True))
                    elif b.said is not None and now - b.said >= self.period_s:
                        lines.append(self._line(b, now, first=False))
            for level, line in lines:
                log.log(level, "%s", line)
            time.sleep(self.tick_s)

    @staticmethod
    def _line(b: _Broker, now: float, first: bool) -> tuple[int, str]:
        """Holds the lock."""
        b.said = now
        level = max(lvl for _, lvl in b.failing.values())
        many = f" ({len(b.failing)} of {len(b.links)} links of this process)" if len(b.links) > 1 else ""
        if first:
            return level, f"cannot reach the broker at {b.url}{many}, retrying: {b.error}"
        return level, f"still cannot reach the broker at {b.url} after {now - b.since:.0f} s{many}: {b.error}"


# The process's reporter: every MqttLink reports to it.
OUTAGES = OutageReporter()


class _Client(paho.Client):
    """paho's client, telling the link why each connection attempt failed.

    paho's network thread catches the OSError of a failed attempt (refused,
    a host name that does not resolve, TLS), calls ``on_connect_fail``
    without it, and retries; any other exception (a host name that cannot
    even be encoded) would end that thread, and with it every retry, with a
    traceback nobody reads on a device. ``on_attempt`` hears None as an
    attempt starts and the exception when it fails, which is passed on as an
    OSError so that paho keeps retrying.

    Driven by an ``MqttLoop`` instead of paho's thread, the loop sets
    ``socket_factory``, which opens the connection without blocking."""

    on_attempt: Callable[[BaseException | None], None] | None = None
    socket_factory: Callable[[], Any] | None = None

    def _create_socket(self) -> Any:
        if self.socket_factory is not None:
            return self.socket_factory()
        return super()._create_socket()

    def reconnect(self) -> paho.MQTTErrorCode:
        if self.on_attempt is not None:
            self.on_attempt(None)
        try:
            return super().reconnect()
        except OSError as exc:
            if self.on_attempt is not None:
                self.on_attempt(exc)
            raise
        except ValueError as exc:
            if self.on_attempt is not None:
                self.on_attempt(exc)
            raise OSError(str(exc)) from exc


class MqttLink:
    """One MQTT connection.

    ``sink`` receives every ``LinkEvent`` (typically ``queue.Queue.put``); it
    runs on paho's network thread and must be quick. When it blocks (a full
    bounded queue) paho stops reading, which pushes back on the broker.

    Failed connection attempts are reported to ``OUTAGES`` (logged), unless
    ``report_outages`` is False: a one-shot command that gives up and says
    why itself (``fedge status``, with ``last_error``). ``connected``,
    ``down_since`` and ``connect_failures`` are for metrics.

    With ``loop`` (a ``fedge.mqtt_loop.MqttLoop``), the loop's thread drives
    the connection instead of a paho thread of its own, and ``sink`` runs on
    that thread, shared by every link of the loop: it must not block.
    ``shaping`` (``fedge.mqtt_loop.Shaping``, loop only) simulates the
    network: rates and a delay.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        sink: Callable[[LinkEvent], None],
        *,
        subscriptions: Iterable[str] = (),
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        name: str | None = None,
        report_outages: bool = True,
        loop: MqttLoop | None = None,
        shaping: Shaping | None = None,
    ) -> None:
        settings.check()  # the URL and protocol, as the config checks them
        self.settings = settings
        self.client_id = client_id
        self.name = name or client_id
        self.sink = sink
        self.subscriptions = list(subscriptions)
        self.loop = loop
        self.detached = threading.Event()  # a loop-driven link: set once stop() is done
        self.shaping = shaping
        self.host, self.port, tls = parse_url(settings.url)
        self.address = f"{self.host}:{self.port}"
        # A clustered broker's nodes: url first, then each of broker.failover_urls in turn when one cannot be reached.
        self.nodes = [(self.host, self.port), *(parse_url(u)[:2] for u in settings.failover_urls)]
        self._node = 0
        self._limit = settings.max_packet_bytes
        self.chunk_bytes = chunks.chunk_data_size(settings.max_packet_bytes)
        self.bytes_out = 0
        self.bytes_in = 0
        self.refused = 0  # messages not published because they cannot fit the broker's packet limit
        self.connected = threading.Event()
        # Since when (monotonic) the link has been without a connection: from
        # start() to its first, from a drop to the next; None while connected.
        self.down_since: float | None = None
        self.connect_failures = 0  # connection attempts that failed
        # Messages given up because the queue kept while disconnected was full
        # (broker.max_queued_messages); warned about once per outage.
        self.messages_dropped = 0
        self._drop_warned = False
        self.last_error = ""  # why the last one failed, and what to do about it
        self._attempt_failed = False  # the attempt under way has failed (and was counted)
        self._report_outages = report_outages
        self._announced = 0  # the last Maximum Packet Size a CONNACK gave, once logged
        self._fits = 0  # the largest publish the broker ever acknowledged
        self._suspect = 0  # the size outstanding at the last drop (see _blame_packet_size)
        self._sent: list[_Sent] = []  # in publish order, as paho queues them
        # Held while handing messages to paho, never while paho calls us from
        # a place that holds its own locks (on_disconnect can be such a place).
        self._lock = threading.RLock()
        self._closing = False
        # The QoS of each subscription: 1, unless the owner says a topic needs
        # less (a device's retained state: fedge.topics.JobTopics.subscription_qos).
        self.qos_of: Callable[[str], int] = lambda topic: 1
        if settings.protocol == "5":
            protocol = paho.MQTTv5
            self.client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        else:  # "3.1.1" or "311": settings.check() refused anything else
            protocol = paho.MQTTv311
            self.client = _Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, clean_session=not persistent
            )
        self._v5 = protocol == paho.MQTTv5
        self._persistent = persistent
        c = self.client
        # broker.max_queued_messages bounds what is kept while disconnected (see
        # _send); a live connection drains its queue, and a burst (a receipt for
        # each of thousands of updates closing at once) must not be cut by a bound
        # meant for outages, so paho's own bound, which counts both, is off.
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(32)
        c.reconnect_delay_set(max(1, round(settings.reconnect_min_s)), max(1, round(settings.reconnect_max_s)))
        if settings.username:
            c.username_pw_set(settings.username, settings.password())
        if tls or settings.ca_file or settings.cert_file:
            c.tls_set(
                ca_certs=settings.ca_file or None,
                certfile=settings.cert_file or None,
                keyfile=settings.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            if settings.tls_insecure:
                c.tls_insecure_set(True)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.subscribe_refused = 0  # subscriptions the broker refused (each asked for again later)
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE packet id -> its topics, until the SUBACK
        self._refusals: dict[str, int] = {}  # topic -> refusals in a row
        self._generation = 0  # connections so far
        self.client.on_attempt = self._on_attempt
        self._started = False

    # --- lifecycle -----------------------------------------------------------

    @property
    def max_packet_bytes(self) -> int:
        """The largest packet this link sends: ``broker.max_packet_bytes``, or
        the broker's limit once learned, if lower."""
        return self._limit

    def start(self) -> None:
        if self.loop is not None:
            self.loop.reserve(1)  # too few descriptors: one line now, before anything started
        self._closing = False
        self.down_since = monotonic()
        if self._report_outages:
            OUTAGES.join(self)
        props = None
        clean_start: Any = paho.MQTT_CLEAN_START_FIRST_ONLY
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            if self._persistent:
                props.SessionExpiryInterval = self.settings.session_expiry_s
                clean_start = False
            else:
                clean_start = True
        self.client.connect_async(
            self.host, self.port, keepalive=self.settings.keepalive_s, clean_start=clean_start, properties=props
        )
        if self.loop is not None:
            self.loop.attach(self)
        else:
            self.client.loop_start()
        self._started = True

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0, wait: bool = True) -> None:
        """Disconnect cleanly; ``final`` (topic, payload) is published retained
        first (e.g. an 'offline' status, which a clean disconnect does not
        trigger as a last will). A link on an ``MqttLoop`` with ``wait``
        false returns at once; ``detached`` is set once it is done."""
        if not self._started:
            return
        on_loop = self.loop is not None and self.loop.in_loop_thread()
        if final is not None and self.connected.is_set():
            info = self.publish(final[0], final[1], retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(0 if on_loop or not wait else timeout)  # the loop's thread would wait for itself
        self._closing = True
        OUTAGES.leave(self)
        if self.loop is not None:
            # DISCONNECT, then the loop closes the socket (no wake-up pair to close)
            self.detached = self.loop.detach(self, timeout, wait=wait)
            self._started = False
            return
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its wake-up socket pair (two loopback TCP sockets) only
        # when the client is garbage collected; a process that opens and
        # closes many links (a simulated fleet, the benchmarks) would leak
        # them, and paho's select() fails once descriptors pass 1024.
        reset = getattr(self.client, "_reset_sockets", None)
        if callable(reset):
            reset()
        self._started = False

    # --- publishing ------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> paho.MQTTMessageInfo:
        """Publish one packet. One over the broker's known packet limit is
        refused (logged, counted in ``refused``, ``rc`` MQTT_ERR_PAYLOAD_SIZE):
        sent, it would only get the connection dropped."""
        size = publish_packet_bytes(topic, len(payload), self._v5)
        if size > self._limit:
            self._refuse(f"a {size}-byte packet to {topic}")
            info = paho.MQTTMessageInfo(0)
            info.rc = paho.MQTT_ERR_PAYLOAD_SIZE
            return info
        with self._lock:
            sent = _Sent(payload, retain, None, [topic], [size], [])
            self._track(sent)
            info = self._send(topic, payload, retain)
            sent.infos.append(info)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:  # given up: nothing to keep for a reconnect
                self._sent.remove(sent)
                return info
        self.bytes_out += len(payload)
        return info

    def publish_chunked(self, topic_for: Callable[[int], str], message: bytes, *, retain: bool = False
                        ) -> list[paho.MQTTMessageInfo]:
        """Publish ``message`` as chunks; chunk i goes to ``topic_for(i)``.
        Returns nothing when the broker's limit is too small to chunk for."""
        with self._lock:
            if not self.chunk_bytes:
                self._refuse(f"a {len(message)}-byte message to {topic_for(0)} (cannot chunk that small)")
                return []
            sent = _Sent(message, retain, topic_for, [], [], [])
            self._track(sent)
            payload_bytes = self._send_chunks(sent)
            if sent.infos and all(i.rc == paho.MQTT_ERR_QUEUE_SIZE for i in sent.infos):
                self._sent.remove(sent)  # given up whole: nothing to keep for a reconnect
        self.bytes_out += payload_bytes
        return list(sent.infos)

    def clear_retained(self, topic: str) -> None:
        self.publish(topic, b"", retain=True)

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        if self.connected.is_set():
            self._subscribe([topic])

    def _subscribe(self, topics: list[str]) -> None:
        """SUBSCRIBE ``topics`` (at ``qos_of`` each: QoS 1 unless told),
        remembering which packet asked for them so that a refusal in the
        SUBACK is told (``_on_subscribe``)."""
        with self._lock:
            rc, mid = self.client.subscribe([(t, self.qos_of(t)) for t in topics])
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._subscribing[mid] = list(topics)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list[paho.ReasonCode],
                      properties: Properties | None) -> None:
        """A SUBACK: a subscription the broker refused (its ACL, or a broker
        that could not set it up, as NATS's MQTT gateway under load) is
        logged, counted in ``subscribe_refused`` and asked for again later,
        with a growing delay (``SUBSCRIBE_RETRY_S``): never left silently
        missing, which would leave the service deaf to that topic."""
        with self._lock:
            topics = self._subscribing.pop(mid, [])
            refused = [(t, r) for t, r in zip(topics, reasons, strict=False) if r.is_failure]
            for topic, _ in zip(topics, reasons, strict=False):
                if topic not in (t for t, _ in refused):
                    self._refusals.pop(topic, None)
            if not refused or self._closing:
                return
            self.subscribe_refused += len(refused)
            delays = []
            for topic, reason in refused:
                streak = self._refusals.get(topic, 0)
                self._refusals[topic] = streak + 1
                delay = min(SUBSCRIBE_RETRY_S[1], SUBSCRIBE_RETRY_S[0] * 2 ** streak)
                delays.append(delay)
                if streak == 0 or streak % 10 == 0:
                    log.warning("%s: the broker refused the subscription to %s (%s, %d time%s); asking again in "
                                "%.3g s: check the broker's ACL for this client and the broker's log", self.name,
                                topic, reason, streak + 1, "" if streak == 0 else "s", delay)
            generation = self._generation
            retry = [t for t, _ in refused]
        self._later(max(delays) * (1 + 0.25 * _jitter()), lambda: self._resubscribe(retry, generation))

    def _resubscribe(self, topics: list[str], generation: int) -> None:
        """Ask again for refused subscriptions still wanted (a reconnect in
        between asked for every one already)."""
        if self._closing or generation != self._generation or not self.connected.is_set():
            return
        wanted = [t for t in topics if t in self.subscriptions]
        if wanted:
            self._subscribe(wanted)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if self.loop is not None:
            self.loop.call_later(delay, fn)
            return
        timer = threading.Timer(delay, fn)
        timer.daemon = True
        timer.start()

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; also forgets a subscription the broker
        kept from an earlier connection of this client id."""
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
        self.client.unsubscribe(topic)

    # --- packet limits ----------------------------------------------------------

    def _send(self, topic: str, payload: bytes | bytearray, retain: bool, bounded: bool = True
              ) -> paho.MQTTMessageInfo:
        """Hand one packet to paho. While disconnected, one past
        ``broker.max_queued_messages`` packets waiting is given up (counted in
        ``messages_dropped``, ``rc`` MQTT_ERR_QUEUE_SIZE); ``bounded=False``:
        a packet already counted (chunked again on reconnect). Holds _lock."""
        if bounded and self._over_queue():
            return self._give_up(topic)[0]
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def _over_queue(self) -> bool:
        """Disconnected, with more than ``broker.max_queued_messages`` packets
        waiting, the one being published included (it is tracked first)."""
        limit = self.settings.max_queued_messages
        return bool(limit) and not self.connected.is_set() and sum(len(m.unacked_sizes()) for m in self._sent) > limit

    def _give_up(self, topic: str, packets: int = 1) -> list[paho.MQTTMessageInfo]:
        """A message not kept: counted, warned about once per outage."""
        self.messages_dropped += 1
        if not self._drop_warned:
            self._drop_warned = True
            log.warning("%s: broker unreachable and %d messages already queued (broker.max_queued_messages): "
                        "dropping what is published until it is back, starting with a message to %s",
                        self.name, self.settings.max_queued_messages, topic)
        infos = [paho.MQTTMessageInfo(0) for _ in range(packets)]
        for info in infos:
            info.rc = paho.MQTT_ERR_QUEUE_SIZE
        return infos

    def _send_chunks(self, sent: _Sent, bounded: bool = True) -> int:
        """(Re)publish ``sent.message`` in chunks of the current size; returns
        the payload bytes. ``bounded``: all of it is given up when it does not
        fit the queue kept while disconnected (see ``_send``). Holds _lock."""
        topic_for = sent.topic_for
        if topic_for is None:
            raise TypeError("not a chunked message")
        parts = chunks.split(sent.message, self.chunk_bytes)
        topics = [topic_for(i) for i in range(len(parts))]
        sizes = [publish_packet_bytes(t, len(part), self._v5) for t, part in zip(topics, parts, strict=True)]
        infos: list[paho.MQTTMessageInfo] = []
        sent.topics, sent.sizes, sent.infos = topics, sizes, infos
        if bounded and self._over_queue():
            infos += self._give_up(topics[0], len(parts))
            return 0
        for t, part in zip(topics, parts, strict=True):
            infos.append(self._send(t, part, sent.retain, bounded=False))
        return sum(len(part) for part in parts)

    def _track(self, sent: _Sent) -> None:
        """Remember ``sent`` (before handing it to paho, so that a drop in the
        middle sees it) and forget what the broker acknowledged in full (from
        the front: acknowledgements come in publish order). Holds _lock."""
        done = 0
        for old in self._sent:
            if not old.settled():
                break
            self._fits = max([self._fits, *old.acked_sizes()])
            done += 1
        del self._sent[:done]
        self._sent.append(sent)

    def _refuse(self, what: str) -> None:
        self.refused += 1
        log.error("%s: not publishing %s: over the broker's packet limit of %d bytes (broker.max_packet_bytes=%d)",
                  self.name, what, self._limit, self.settings.max_packet_bytes)

    def _set_limit(self, limit: int) -> None:
        self._limit = limit
        self.chunk_bytes = chunks.chunk_data_size(limit) if limit >= MIN_PACKET_BYTES else 0

    def _adopt_announced_limit(self, properties: Properties | None) -> None:
        """MQTT 5: the broker's Maximum Packet Size from CONNACK, if it gave one."""
        announced = getattr(properties, "MaximumPacketSize", None) if self._v5 else None
        if not announced:
            return
        configured = self.settings.max_packet_bytes
        self._set_limit(min(configured, int(announced)))
        if announced >= configured or announced == self._announced:
            return
        self._announced = announced
        if self.chunk_bytes:
            log.warning("%s: broker %s accepts packets of at most %d bytes (MQTT 5 Maximum Packet Size), below "
                        "broker.max_packet_bytes=%d; chunking below it", self.name, self.address, announced,
                        configured)
        else:
            log.error("%s: broker %s accepts packets of at most %d bytes (MQTT 5 Maximum Packet Size), too small "
                      "to chunk for (broker.max_packet_bytes=%d; chunks need %d): only small messages will be "
                      "published", self.name, self.address, announced, configured, MIN_PACKET_BYTES)

    def _blame_packet_size(self) -> str:
        """After a dropped connection: if a publish larger than any the broker
        ever acknowledged was outstanding, take it as over the broker's limit
        and lower ours. Returns a note for the LinkDown reason, or ''.

        Runs in on_disconnect, where paho may hold its own locks, so it takes
        no lock: it reads a copy of the list, and only the network thread
        (this one) ever changes a recorded message."""
        sent = self._sent[:]
        fits = max([self._fits, *(size for m in sent for size in m.acked_sizes())])
        refused = max((size for m in sent if not m.layout_fits() for size in m.unacked_sizes()
                       if size > max(fits, BLAMELESS_PACKET_BYTES)), default=0)
        if not refused:
            self._suspect = 0
            return ""
        if refused != self._suspect:
            # Once is a coincidence (a network blip, a broker's own bug): a
            # packet over the limit is refused every time it is sent, so the
            # limit is lowered when the same size is outstanding at the next
            # drop too.
            self._suspect = refused
            return f"a {refused}-byte publish was outstanding; if it is again at the next drop, it is too large"
        self._suspect = 0
        configured = self.settings.max_packet_bytes
        self._set_limit(lowered_limit(self._limit, refused, fits))
        if self.chunk_bytes:
            log.warning("%s: broker %s dropped the connection with a %d-byte publish outstanding, taken as over its "
                        "packet limit (broker.max_packet_bytes=%d): keeping packets to %d bytes from now on; set "
                        "broker.max_packet_bytes to the broker's max_packet_size", self.name, self.address,
                        refused, configured, self._limit)
        else:
            log.error("%s: broker %s drops the connection even on a %d-byte publish (broker.max_packet_bytes=%d), "
                      "too small to chunk for (chunks need %d bytes): giving up messages over %d bytes; raise the "
                      "broker's max_packet_size", self.name, self.address, refused, configured, MIN_PACKET_BYTES,
                      self._limit)
        return f"a {refused}-byte publish was over the broker's packet limit; now at most {self._limit}"

    def _fit_queue(self) -> None:
        """Before paho sends again what the last connection left unacknowledged:
        chunk again, at the current size, each message with a packet over the
        limit; give up what cannot be chunked. Holds _lock; runs in
        on_connect, before paho resends its queue."""
        def misfit(m: _Sent) -> bool:
            return not m.layout_fits() and max(m.unacked_sizes(), default=0) > self._limit

        if not any(misfit(m) for m in self._sent):
            return
        queued = {id(msg.info): msg for msg in _take_queue(self.client)}
        kept: list[_Sent] = []
        for m in self._sent:  # publish order, so paho's queue keeps its order
            if not misfit(m):
                for k, info in enumerate(m.infos):
                    msg = queued.pop(id(info), None)
                    if msg is not None:
                        m.infos[k] = self._send(msg.topic, msg.payload, msg.retain, bounded=False)
                kept.append(m)
            elif m.topic_for is not None and self.chunk_bytes:
                for info in m.infos:
                    queued.pop(id(info), None)
                self._send_chunks(m, bounded=False)
                kept.append(m)
            else:
                for info in m.infos:
                    queued.pop(id(info), None)
                self._refuse(f"a {len(m.message)}-byte message to {m.topics[0]} any more")
        for msg in queued.values():  # none: everything we publish is recorded
            self._send(msg.topic, msg.payload, msg.retain, bounded=False)
        self._sent = kept

    # --- paho callbacks (network thread) ------------------------------------------

    def _on_attempt(self, exc: BaseException | None) -> None:
        if exc is None:
            self._attempt_failed = False
        else:
            self._failed(describe_failure(exc, self.host, self.port, self.client.connect_timeout), logging.WARNING)
            self._next_node()

    def _next_node(self) -> None:
        """The node to try next, after one that could not be reached (a
        clustered broker: ``broker.failover_urls``)."""
        if len(self.nodes) < 2:
            return
        self._node = (self._node + 1) % len(self.nodes)
        self.host, self.port = self.nodes[self._node]
        self.address = f"{self.host}:{self.port}"
        # paho's own fields: its setters refuse while the failed socket is not yet released.
        self.client._host, self.client._port = self.host, self.port
        log.info("%s: trying the broker node at %s next", self.name, self.address)

    def _failed(self, error: str, level: int) -> None:
        """The attempt under way failed: counted and reported once, however
        many of paho's callbacks say so (a refusal is a failed CONNACK and
        then a disconnect)."""
        if self._attempt_failed or self._closing:
            return
        self._attempt_failed = True
        self.connect_failures += 1
        self.last_error = error
        if self._report_outages:
            OUTAGES.failed(self, error, level)

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: paho.ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            text = str(reason)
            if "authori" in text.lower() or "password" in text.lower():
                self._failed(f"the broker refused the connection ({text}); check broker.username and the password "
                             f"in ${self.settings.password_env} or broker.password_file", logging.ERROR)
            else:
                self._failed(f"the broker refused the connection ({text}); see the broker's log", logging.ERROR)
            return
        with self._lock:
            if self._drop_warned:
                log.warning("%s: reconnected; %d messages were dropped while the broker was unreachable",
                            self.name, self.messages_dropped)
                self._drop_warned = False
            self._adopt_announced_limit(properties)
            self._fit_queue()
        self._generation += 1  # refused subscriptions waiting to be asked again: asked for now
        with self._lock:
            # SUBACKs owed on the last connection never come: their packet ids
            # are paho's to reuse, and must not name those topics.
            self._subscribing.clear()
        if self.subscriptions:
            self._subscribe(list(self.subscriptions))
        self.down_since = None
        self.connected.set()
        if self._report_outages:
            OUTAGES.reached(self)
        self.sink(LinkUp(self.name, bool(flags.session_present)))

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason: paho.ReasonCode, properties: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self.down_since = monotonic()
        elif not self._closing:  # closed before accepting us (a refusal was counted already)
            self._failed(f"the broker closed the connection before accepting it ({reason}); check that "
                         "broker.url's scheme (mqtt:// or mqtts://) matches the port, and the broker's log",
                         logging.WARNING)
        text = str(reason)
        dropped = reason.value == PACKET_TOO_LARGE or (
            reason.is_failure and not flags.is_disconnect_packet_from_server)
        if dropped and not self._closing:
            note = self._blame_packet_size()
            text = f"{text}; {note}" if note else text
        if was:
            self.sink(LinkDown(self.name, text))

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.bytes_in += len(msg.payload)
        self.sink(Inbound(self.name, msg.topic, bytes(msg.payload), bool(msg.retain)))


class Inbox:
    """The queue between network threads and a role's own thread.

    Bounded in items and in payload bytes, so a flood or a slow consumer
    cannot grow memory: when full, the network thread waits, paho stops
    reading its socket, and the broker keeps the rest queued for us. One item
    is always admitted into an empty inbox, however large, so nothing can
    deadlock."""

    def __init__(self, maxsize: int = 1024, max_bytes: int = 32 << 20) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._items: collections.deque[object] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        # Woken only when someone waits on them: a busy inbox passes items
        # at a notify per wait, not per item.
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._getters = 0
        self._putters = 0

    @staticmethod
    def _size(item: object) -> int:
        return len(item.payload) if isinstance(item, Inbound) else 0

    def put(self, item: object) -> None:
        size = self._size(item)
        with self._lock:
            while self._items and (len(self._items) >= self.maxsize or self._bytes + size > self.max_bytes):
                self._putters += 1
                try:
                    self._not_full.wait()
                finally:
                    self._putters -= 1
            self._items.append(item)
            self._bytes += size
            if self._getters:
                self._not_empty.notify()

    def get(self, timeout: float | None) -> object | None:
        with self._lock:
            if not self._items:
                self._getters += 1
                try:
                    self._not_empty.wait(None if timeout is None else max(0.0, timeout))
                finally:
                    self._getters -= 1
            if not self._items:
                return None
            item = self._items.popleft()
            self._bytes -= self._size(item)
            if self._putters:
                self._not_full.notify_all()  # several may wait; each checks its own room
            return item

    def __len__(self) -> int:
        return len(self._items)


def monotonic() -> float:
    return time.monotonic()
