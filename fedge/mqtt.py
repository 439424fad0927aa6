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
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge import chunks
from fedge.config import BrokerSettings, ConfigError
from fedge.transport import Inbound, LinkDown, LinkEvent, LinkUp

__all__ = ["Inbound", "Inbox", "LinkDown", "LinkEvent", "LinkUp", "MqttLink", "monotonic", "parse_url"]

log = logging.getLogger("fedge.mqtt")

# paho waits on its sockets with select(), which cannot watch a descriptor
# numbered 1024 or more, and every link holds three (its connection and a
# wake-up pair). One process therefore runs at most this many links; larger
# simulated fleets run as several processes.
MAX_LINKS_PER_PROCESS = 300


def parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ConfigError(f"broker.url {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    tls = parts.scheme in ("mqtts", "ssl")
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


class MqttLink:
    """One MQTT connection.

    ``sink`` receives every ``LinkEvent`` (typically ``queue.Queue.put``); it
    runs on paho's network thread and must be quick. When it blocks (a full
    bounded queue) paho stops reading, which pushes back on the broker.
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
    ) -> None:
        settings.check()  # the URL and protocol, as the config checks them
        self.settings = settings
        self.client_id = client_id
        self.name = name or client_id
        self.sink = sink
        self.subscriptions = list(subscriptions)
        self.host, self.port, tls = parse_url(settings.url)
        self.address = f"{self.host}:{self.port}"
        self.chunk_bytes = chunks.chunk_data_size(settings.max_packet_bytes)
        self.bytes_out = 0
        self.bytes_in = 0
        self.connected = threading.Event()
        self._last_refusal = ""
        if settings.protocol == "5":
            protocol = paho.MQTTv5
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        else:  # "3.1.1" or "311": settings.check() refused anything else
            protocol = paho.MQTTv311
            self.client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, clean_session=not persistent
            )
        self._v5 = protocol == paho.MQTTv5
        self._persistent = persistent
        c = self.client
        c.max_queued_messages_set(settings.max_queued_messages)
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
        self._started = False

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
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
        self.client.loop_start()
        self._started = True

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly; ``final`` (topic, payload) is published retained
        first (e.g. an 'offline' status, which a clean disconnect does not
        trigger as a last will)."""
        if not self._started:
            return
        if final is not None and self.connected.is_set():
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
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
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            log.warning("%s: outgoing queue full; dropped a message to %s", self.name, topic)
        self.bytes_out += len(payload)
        return info

    def publish_chunked(self, topic_for: Callable[[int], str], message: bytes, *, retain: bool = False
                        ) -> list[paho.MQTTMessageInfo]:
        """Publish ``message`` as chunks; chunk i goes to ``topic_for(i)``."""
        return [
            self.publish(topic_for(i), part, retain=retain)
            for i, part in enumerate(chunks.split(message, self.chunk_bytes))
        ]

    def clear_retained(self, topic: str) -> None:
        self.client.publish(topic, b"", qos=1, retain=True)

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; also forgets a subscription the broker
        kept from an earlier connection of this client id."""
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
        self.client.unsubscribe(topic)

    # --- paho callbacks (network thread) ------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: paho.ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            text = str(reason)
            if text != self._last_refusal:
                hint = ""
                if "authori" in text.lower() or "password" in text.lower():
                    hint = f"; check broker.username and the password in ${self.settings.password_env}"
                log.error("%s: broker %s:%d refused the connection: %s%s", self.name, self.host, self.port, text, hint)
                self._last_refusal = text
            return
        self._last_refusal = ""
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
        self.connected.set()
        self.sink(LinkUp(self.name, bool(flags.session_present)))

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason: paho.ReasonCode, properties: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self.sink(LinkDown(self.name, str(reason)))

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
        self._cond = threading.Condition()

    @staticmethod
    def _size(item: object) -> int:
        return len(item.payload) if isinstance(item, Inbound) else 0

    def put(self, item: object) -> None:
        size = self._size(item)
        with self._cond:
            while self._items and (len(self._items) >= self.maxsize or self._bytes + size > self.max_bytes):
                self._cond.wait()
            self._items.append(item)
            self._bytes += size
            self._cond.notify_all()

    def get(self, timeout: float | None) -> object | None:
        with self._cond:
            if not self._items:
                self._cond.wait(None if timeout is None else max(0.0, timeout))
            if not self._items:
                return None
            item = self._items.popleft()
            self._bytes -= self._size(item)
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        return len(self._items)


def monotonic() -> float:
    return time.monotonic()
