"""Prometheus metrics: the settings and the HTTP listener both roles share,
a collector fed by snapshots, and byte counts by channel.

A service's loop owns its state; the listener answers scrapes on a thread of
its own. So the loop never shares a live object with that thread: at most
once a second (and whenever something worth seeing happens) it builds a
plain-data ``snapshot`` and swaps it in with one reference assignment, and
``SnapshotCollector`` turns the latest snapshot into metric families when
Prometheus asks. Latency histograms are ``prometheus_client`` instruments,
which are thread-safe, observed from the loop.

``prometheus_client`` is imported only when metrics are on: an agent that
does not export them does not load it.

Names follow Prometheus conventions: the ``fedge_`` prefix, base units
(seconds, bytes), ``_total`` on counters, and labels with a small, fixed
set of values (a reason, a channel, an outcome); never a device id, which
would make one series per device.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.config import ConfigError, setting

log = logging.getLogger(__name__)

# Latency buckets, in seconds: a fold is milliseconds, a round close
# (checkpoint, publish) up to seconds, a round minutes.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = setting(False, "Serve Prometheus metrics over HTTP (GET /metrics).")
    host: str = setting(
        "127.0.0.1", "Address to listen on; loopback by default. Anything else is reachable by whoever can reach "
        "this host: put TLS (cert_file) or a firewall in front."
    )
    port: int = setting(9464, "TCP port to listen on; 0 picks a free one (tests).")
    cert_file: str = setting("", "TLS certificate (PEM) to serve metrics over HTTPS; empty: plain HTTP.")
    key_file: str = setting("", "Private key of cert_file.")

    def check(self, where: str = "metrics") -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{where}.port = {self.port} is not a TCP port; use 1..65535 (9464 is usual)")
        if not self.host:
            raise ConfigError(f"{where}.host is empty; use 127.0.0.1 (this host only) or an address to listen on")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{where}.cert_file and {where}.key_file go together: set both for HTTPS, or neither")
        for key in ("cert_file", "key_file"):
            value = getattr(self, key)
            if self.enabled and value and not Path(value).is_file():
                raise ConfigError(f"{where}.{key} {value!r} is not a readable file")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsListener:
    """``GET /metrics`` for ``registry`` on ``settings.host:port``, on a
    daemon thread, until ``close()``."""

    def __init__(self, settings: MetricsSettings, registry: Any, what: str) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(
                settings.port, settings.host, registry=registry,
                certfile=settings.cert_file or None, keyfile=settings.key_file or None,
            )
        except (OSError, socket.gaierror) as exc:
            raise ConfigError(f"cannot serve {what} metrics on {settings.host}:{settings.port}: {exc.strerror or exc}"
                              f" (choose another metrics.port, or stop what holds it)") from None
        self.host = settings.host
        self.port = int(self._server.server_address[1])
        scheme = "https" if settings.cert_file else "http"
        log.info("%s metrics at %s://%s:%d/metrics", what, scheme, settings.host, self.port)
        if not _loopback(settings.host) and not settings.cert_file:
            log.warning("%s metrics listen on %s without TLS: anyone who can reach it can read them (job name, "
                        "fleet size, round timings); keep it on a trusted network or set metrics.cert_file",
                        what, settings.host)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class SnapshotCollector:
    """A ``prometheus_client`` collector that renders the latest snapshot.

    ``render(snapshot)`` yields metric families from a plain-data snapshot;
    ``publish(snapshot)`` (from the service's loop) swaps a new one in.
    """

    def __init__(self, render: Callable[[Any], Iterable[Any]]) -> None:
        self._render = render
        self._snapshot: Any = None
        self.published_at = 0.0

    def publish(self, snapshot: Any, now: float | None = None) -> None:
        self._snapshot = snapshot  # one reference swap: the scrape thread sees the old or the new one
        self.published_at = time.monotonic() if now is None else now

    def due(self, now: float, every: float = 1.0) -> bool:
        return now - self.published_at >= every

    def collect(self) -> Iterator[Any]:
        snapshot = self._snapshot
        if snapshot is None:
            return iter(())
        return iter(list(self._render(snapshot)))

    def describe(self) -> Iterator[Any]:
        return iter(())  # families vary with the snapshot; nothing to check at registration


class Traffic:
    """Bytes and messages by (direction, channel), counted on the loop thread
    and copied into snapshots. Channels are a topic's kind (``update``,
    ``status``, ``key`` ...), never a device."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = {}
        self.messages: dict[tuple[str, str], int] = {}

    def add(self, direction: str, channel: str, size: int) -> None:
        key = (direction, channel or "other")
        self.bytes[key] = self.bytes.get(key, 0) + size
        self.messages[key] = self.messages.get(key, 0) + 1

    def copy(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        return dict(self.bytes), dict(self.messages)


class CountingLink:
    """A ``fedge.transport.Link`` that counts what it publishes, by channel.

    ``channel_of(topic)`` names a topic's channel. Everything else is passed
    through to the link it wraps."""

    def __init__(self, link: Any, traffic: Traffic, channel_of: Callable[[str], str]) -> None:
        self._link = link
        self._traffic = traffic
        self._channel_of = channel_of
        self._lock = threading.Lock()  # publishes come from the loop and, for a fleet, from several threads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)

    def _count(self, topic: str, size: int) -> None:
        with self._lock:
            self._traffic.add("out", self._channel_of(topic), size)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any:
        self._count(topic, len(payload))
        return self._link.publish(topic, payload, retain=retain)

    def publish_chunked(self, topic_for: Callable[[int], str], message: bytes, *, retain: bool = False) -> list[Any]:
        result = self._link.publish_chunked(topic_for, message, retain=retain)
        with self._lock:  # the message's bytes (chunk headers add a few dozen each), one message per chunk
            key = ("out", self._channel_of(topic_for(0)) or "other")
            self._traffic.bytes[key] = self._traffic.bytes.get(key, 0) + len(message)
            self._traffic.messages[key] = self._traffic.messages.get(key, 0) + len(result)
        return result


# name -> (type, help, labels): each role's public metrics.
MetricTable = dict[str, tuple[str, str, tuple[str, ...]]]


class Families:
    """Metric families built from a role's ``MetricTable`` (its help and labels)."""

    def __init__(self, table: MetricTable) -> None:
        self.table = table

    def gauge(self, name: str, value: float | None, labels: dict[str, str] | None = None) -> Any:
        """A gauge with one sample (none when ``value`` is None: unknown, not 0)."""
        from prometheus_client.core import GaugeMetricFamily

        _kind, doc, names = self.table[name]
        family = GaugeMetricFamily(name, doc, labels=list(names))
        if value is not None:
            family.add_metric([labels[n] for n in names] if labels else [], float(value))
        return family

    def gauges(self, name: str, samples: Iterable[tuple[list[str], float]]) -> Any:
        """A labelled gauge with a sample per label-value list."""
        from prometheus_client.core import GaugeMetricFamily

        _kind, doc, names = self.table[name]
        family = GaugeMetricFamily(name, doc, labels=list(names))
        for values, value in samples:
            family.add_metric(values, float(value))
        return family

    def histogram(self, name: str, counts: dict[int, int], bounds: Iterable[float]) -> Any:
        """A histogram of whole-number observations counted by value
        (``counts``), in buckets up to each of ``bounds``."""
        from prometheus_client.core import HistogramMetricFamily

        _kind, doc, _names = self.table[name]
        buckets = [(f"{b:g}", float(sum(n for v, n in counts.items() if v <= b))) for b in bounds]
        buckets.append(("+Inf", float(sum(counts.values()))))
        return HistogramMetricFamily(name, doc, buckets=buckets,
                                     sum_value=float(sum(v * n for v, n in counts.items())))

    def counter(self, name: str, values: dict[Any, int]) -> Any:
        """A counter ``name`` (ending in ``_total``) with a sample per key: a
        label value, a tuple of them, or anything for an unlabelled one."""
        from prometheus_client.core import CounterMetricFamily

        _kind, doc, names = self.table[name]
        family = CounterMetricFamily(name[: -len("_total")], doc, labels=list(names))
        for key, value in sorted(values.items()):
            family.add_metric(list(key) if isinstance(key, tuple) else ([key] if names else []), float(value))
        return family


class ServiceMetrics:
    """A service's own registry (never the process-wide default: two services
    in one process must not mix), the process and platform collectors, a
    ``SnapshotCollector`` over ``render``, histograms from the table, and
    (``start`` to ``close``) the HTTP listener."""

    def __init__(self, settings: MetricsSettings, table: MetricTable, render: Callable[[Any], Iterable[Any]],
                 what: str) -> None:
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        self.settings = settings
        self.table = table
        self.what = what
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.collector = SnapshotCollector(render)
        self.registry.register(self.collector)
        self.listener: MetricsListener | None = None

    def histogram(self, name: str, buckets: tuple[float, ...]) -> Any:
        from prometheus_client import Histogram

        return Histogram(name, self.table[name][1], buckets=buckets, registry=self.registry)

    def start(self) -> None:
        self.listener = MetricsListener(self.settings, self.registry, self.what)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
