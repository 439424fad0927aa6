"""Many MQTT connections on one thread: ``MqttLoop``.

``MqttLink`` normally runs paho's own network thread (``loop_start``): a
thread, a ``select()`` and a wake-up socket pair per connection, which caps
a process at a few hundred links (``select()`` fails past descriptor 1024).
A link made with ``MqttLink(..., loop=MqttLoop())`` is driven by the loop
instead: one thread, one ``selectors.DefaultSelector`` (epoll on Linux) and
one descriptor per connection, for any number of links (a simulated fleet of
10,000 devices, each with its own connection and identity).

What the loop does for each link, in place of paho's thread:

- connects without blocking (a non-blocking ``connect``, TLS through memory
  BIOs so that a handshake waits on the selector, not the thread; host names
  resolved once per ``RESOLVE_TTL_S``), at most ``max_connecting`` TCP
  connects and TLS handshakes at once so that 10,000 links starting together
  do not overflow the broker's listen queue (Mosquitto's holds 100);
- reads when the socket is readable and writes while paho has packets to
  send (paho asks through ``on_socket_register_write``), calls paho's
  ``loop_misc`` (keepalive pings, a silent broker) about once per
  ``tick_s`` per link, spread over the tick so that idle links cost little
  (10,000 idle links with a 30 s keepalive: about 2% of one core, 13 KiB of
  memory each, against a Mosquitto on the same host);
- reconnects after a dropped connection or failed attempt with the link's
  capped exponential backoff (``broker.reconnect_min_s`` doubling up to
  ``broker.reconnect_max_s``, plus up to ``jitter`` of it so that a fleet
  does not retry in step), reset once a connection is accepted;
- tells the link why an attempt failed (refused, a name that does not
  resolve, TLS, a timeout), as paho's thread does through ``_Client``.

Optionally, per link, a simulated network (``Shaping``): a token bucket on
the bytes paho writes and one on those it reads (bytes/s; 0 = unlimited), and
a one-way delay each way (bytes written reach the kernel, and bytes read
reach paho, ``delay_s`` later; the TCP handshake itself is not delayed). A
write beyond the bucket is a partial write (or ``EAGAIN``) to paho, which
keeps the rest and is called again when the bucket has refilled; reads
likewise. Over TLS the buckets count what paho writes and reads (before
encryption) and the delay holds the encrypted bytes. Change it at any time
with ``MqttLoop.shape`` (a new delay applies from the next connection).

The sink of a loop-driven link runs on the loop's thread: it must not block
(a bounded queue that is full stalls every link of the loop, not just one).
Stopping a link from its own sink is allowed: it does not wait (a ``final``
message is published, not waited for).

Descriptors: every link holds one while connected. ``reserve(n)`` (and
``attach``, as links are added) checks ``RLIMIT_NOFILE``, raises the soft
limit up to the hard one when needed, and otherwise fails with one line
naming ``ulimit -n`` and the number needed (``DescriptorLimitError``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import os
import random
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho

if TYPE_CHECKING:
    from fedge.mqtt import MqttLink

__all__ = [
    "DESCRIPTOR_MARGIN",
    "DescriptorLimitError",
    "MqttLoop",
    "Shaping",
    "TokenBucket",
    "ensure_descriptors",
]

log = logging.getLogger("fedge.mqtt")

# Descriptors a process needs besides one per link: the loop's own (its
# selector and wake-up pair), standard streams, log files, state files, a
# model being loaded, the metrics server.
DESCRIPTOR_MARGIN = 64
RESOLVE_TTL_S = 30.0  # how long a resolved broker address is reused
RESOLVE_FAIL_TTL_S = 5.0  # and a name that did not resolve is not asked again
IO_CHUNK = 65536  # bytes read from the kernel at once (shaped links)
BUFFER_CAP = 65536  # bytes a shaped link holds on each side before pushing back
MIN_GRANT = 512  # a starved bucket wakes its link once this much is there (or a full bucket, if smaller)
SLICES = 20  # each tick's loop_misc calls are spread over this many wake-ups

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class DescriptorLimitError(RuntimeError):
    """The process may not open enough descriptors for its links."""


def ensure_descriptors(links: int, margin: int = DESCRIPTOR_MARGIN) -> int:
    """Make sure this process may open ``links`` connections (one descriptor
    each) plus ``margin``; raises the soft ``RLIMIT_NOFILE`` up to the hard
    one when needed. Returns the limit; raises ``DescriptorLimitError`` (one
    line, naming ``ulimit -n`` and the number needed) when even the hard
    limit is too low."""
    import resource

    needed = links + margin
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    for target in (hard, needed) if hard != resource.RLIM_INFINITY else (needed,):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        log.info("raised this process's open-file limit to %s for %d MQTT connections", soft, links)
        return needed if soft == resource.RLIM_INFINITY else soft
    raise DescriptorLimitError(
        f"{links} MQTT connections need {needed} open files but this process may open only {soft}: raise the "
        f"limit with `ulimit -n {needed}` in the shell that starts it (LimitNOFILE={needed} in a systemd unit)")


@dataclass
class Shaping:
    """A simulated network between a link and the broker.

    ``up_bytes_s`` / ``down_bytes_s``: token buckets on the bytes paho
    writes / reads (0 = unlimited), holding ``burst_bytes`` (0: 50 ms of the
    rate, at least 1 KiB); ``delay_s``: one-way delay, each way."""

    up_bytes_s: float = 0.0
    down_bytes_s: float = 0.0
    delay_s: float = 0.0
    burst_bytes: int = 0

    def bucket(self, rate: float, now: float) -> TokenBucket | None:
        return TokenBucket(rate, self.burst_bytes, now) if rate > 0 else None


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` at once; starts full."""

    def __init__(self, rate: float, burst: float = 0, now: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else max(1024.0, self.rate * 0.05)
        self.tokens = self.burst
        self.stamp = time.monotonic() if now is None else now

    def available(self, now: float) -> int:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n

    def ready_at(self, now: float) -> float:
        """When the bucket holds enough to be worth waking for."""
        want = min(self.burst, MIN_GRANT)
        self.available(now)
        return now if self.tokens >= want else now + (want - self.tokens) / self.rate


# The states of a connection the loop opened for paho.
CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)
_EOF = object()  # the peer closed its side (a marker in the delayed-read queue)


class _Conn:
    """The socket paho is given by a loop-driven link.

    To paho it is a non-blocking socket (``recv``, ``send``, ``close``,
    ``fileno``, ``setblocking``) that raises ``BlockingIOError`` while the
    connection is not open yet or a bucket is empty. Unshaped plain TCP goes
    straight to the kernel ("direct"); TLS or a delay goes through buffers
    the loop moves to and from the kernel (``on_readable``,
    ``on_writable``, ``advance``)."""

    def __init__(self, raw: socket.socket, tls: ssl.SSLObject | None, incoming: ssl.MemoryBIO | None,
                 outgoing: ssl.MemoryBIO | None, up: TokenBucket | None, down: TokenBucket | None,
                 delay: float) -> None:
        self.raw = raw
        self.fd = raw.fileno()
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.up = up
        self.down = down
        self.delay = delay
        self.direct = tls is None and delay <= 0
        self.state = CONNECTING
        self.error: OSError | None = None  # the attempt failed or the connection broke: paho's next call raises it
        self.error_told = False  # the loop passed it on (to the link, then to paho)
        self.blocked = ""  # why paho's last send stopped short: "tokens", "kernel", "buffer", "connecting"
        self.starved = False  # paho's last recv found the down bucket empty
        self.consumed = 0  # bytes paho has read
        # Shaped or TLS: bytes on their way, each side.
        self.tx_delayed: collections.deque[tuple[float, bytes]] = collections.deque()
        self.tx_ready = bytearray()
        self.rx_delayed: collections.deque[tuple[float, Any]] = collections.deque()
        self.rx_ready = bytearray()
        self.rx_end: Any = None  # _EOF or an OSError once reached (after rx_ready is read)
        self.raw_done = False  # the kernel said EOF or an error: nothing more to read from it

    # --- what paho calls -------------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        """Always non-blocking."""

    def pending(self) -> int:
        return 0

    def recv(self, bufsize: int) -> bytes:
        if self.error is not None:
            raise self.error
        if self.state != OPEN:
            raise BlockingIOError(errno.EAGAIN, "not connected yet")
        if self.down is not None:
            allowed = self.down.available(time.monotonic())
            if allowed <= 0:
                self.starved = True
                raise BlockingIOError(errno.EAGAIN, "down bucket empty")
            bufsize = min(bufsize, allowed)
        if self.direct:
            data = self.raw.recv(bufsize)
        elif self.rx_ready:
            data = bytes(self.rx_ready[:bufsize])
            del self.rx_ready[:bufsize]
        elif self.rx_end is _EOF:
            return b""
        elif self.rx_end is not None:
            raise self.rx_end
        else:
            raise BlockingIOError(errno.EAGAIN, "nothing arrived")
        if self.down is not None:
            self.down.take(len(data))
        self.consumed += len(data)
        return data

    def send(self, buf: bytes | bytearray) -> int:
        if self.error is not None:
            raise self.error
        if self.state != OPEN:
            self.blocked = "connecting"
            raise BlockingIOError(errno.EAGAIN, "not connected yet")
        n = len(buf)
        now = time.monotonic()
        if self.up is not None:
            allowed = self.up.available(now)
            if allowed <= 0:
                self.blocked = "tokens"
                raise BlockingIOError(errno.EAGAIN, "up bucket empty")
            n = min(n, allowed)
        if self.direct:
            try:
                sent = self.raw.send(memoryview(buf)[:n])
            except BlockingIOError:
                self.blocked = "kernel"
                raise
        else:
            room = BUFFER_CAP - len(self.tx_ready) - sum(len(d) for _, d in self.tx_delayed)
            if room <= 0:
                self.blocked = "buffer"
                raise BlockingIOError(errno.EAGAIN, "send buffer full")
            sent = min(n, room)
            data = bytes(buf[:sent])
            if self.tls is not None:
                try:
                    self.tls.write(data)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    self.blocked = "buffer"
                    raise BlockingIOError(errno.EAGAIN, "TLS busy") from None
                data = self._tls_out()
            self._queue_tx(data, now)
            self._flush(now)
        if self.up is not None:
            self.up.take(sent)
        return sent

    def close(self) -> None:
        if self.state == CLOSED:
            return
        if self.state == OPEN and (self.tx_ready or self.tx_delayed):
            # A clean disconnect's last packet (and whatever was before it)
            # is sent now, without waiting out the delay: best effort.
            data = bytes(self.tx_ready) + b"".join(d for _, d in self.tx_delayed)
            with contextlib.suppress(OSError):
                self.raw.send(data)
        self.state = CLOSED
        self.raw.close()

    # --- what the loop calls -----------------------------------------------------------

    def fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc

    def finish_connect(self, now: float) -> None:
        """The socket became writable (or errored) while connecting."""
        err = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(OSError(err, os.strerror(err)))
            return
        if self.tls is None:
            self.state = OPEN
        else:
            self.state = HANDSHAKE
            self._handshake(now)

    def on_readable(self, now: float) -> None:
        """Shaped or TLS: take what the kernel has (the delay starts now)."""
        if self.direct or self.state == CLOSED or self.raw_done or self._rx_held() >= BUFFER_CAP:
            return
        item: Any
        try:
            item = self.raw.recv(IO_CHUNK) or _EOF
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            item = exc
        self.raw_done = item is _EOF or isinstance(item, OSError)
        self.rx_delayed.append((now + self.delay, item))
        self.advance(now)

    def on_writable(self, now: float) -> None:
        self._flush(now)

    def advance(self, now: float) -> None:
        """Move what the delay has let through: received bytes to paho (via
        TLS), sent bytes to the kernel."""
        while self.rx_delayed and self.rx_delayed[0][0] <= now and self.rx_end is None:
            _, item = self.rx_delayed.popleft()
            if isinstance(item, bytes):
                if self.incoming is not None:
                    self.incoming.write(item)
                    if self.state == HANDSHAKE:
                        self._handshake(now)
                    if self.state == OPEN:
                        self._tls_read()
                else:
                    self.rx_ready += item
            elif self.state == HANDSHAKE:  # closed (or broken) during the handshake
                self.fail(item if isinstance(item, OSError) else ConnectionResetError(
                    errno.ECONNRESET, "the broker closed the connection during the TLS handshake"))
            else:
                self.rx_end = item
        self._flush(now)

    def has_input(self) -> bool:
        """paho has something to read: bytes, or the end of the stream."""
        if self.error is not None:
            return True
        return self.state == OPEN and (bool(self.rx_ready) or self.rx_end is not None)

    def interest(self, paho_writes: bool, now: float) -> tuple[int, float | None]:
        """The selector events to wait for, and when to look again (or None)."""
        if self.state == CLOSED or (self.error is not None and self.error_told):
            return 0, None
        if self.state == CONNECTING:
            return WRITE, None
        mask = 0
        wake: float | None = None

        def at(t: float) -> None:
            nonlocal wake
            wake = t if wake is None else min(wake, t)

        if self.direct:
            if self.starved and self.down is not None:
                at(self.down.ready_at(now))
            else:
                mask |= READ
            if paho_writes:
                if self.blocked == "tokens" and self.up is not None:
                    at(self.up.ready_at(now))
                else:
                    mask |= WRITE
            return mask, wake
        if not self.raw_done and self._rx_held() < BUFFER_CAP:
            mask |= READ
        if self.rx_delayed and self.rx_end is None:
            at(self.rx_delayed[0][0])
        if self.rx_ready and self.state == OPEN:  # paho stopped short: the bucket, or its fair share
            at(self.down.ready_at(now) if self.starved and self.down is not None else now)
        if self.tx_ready:
            mask |= WRITE
        if self.tx_delayed:
            at(self.tx_delayed[0][0])
        if paho_writes and self.state == OPEN and self.blocked == "tokens" and self.up is not None:
            at(self.up.ready_at(now))
        return mask, wake

    # --- inside ----------------------------------------------------------------------

    def _rx_held(self) -> int:
        return len(self.rx_ready) + sum(len(d) for _, d in self.rx_delayed if isinstance(d, bytes))

    def _queue_tx(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.delay > 0:
            self.tx_delayed.append((now + self.delay, data))
        else:
            self.tx_ready += data

    def _flush(self, now: float) -> None:
        while self.tx_delayed and self.tx_delayed[0][0] <= now:
            self.tx_ready += self.tx_delayed.popleft()[1]
        if not self.tx_ready or self.state in (CONNECTING, CLOSED) or self.error is not None:
            return
        try:
            sent = self.raw.send(self.tx_ready)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(exc)
            return
        del self.tx_ready[:sent]

    def _tls_out(self) -> bytes:
        return self.outgoing.read() if self.outgoing is not None else b""

    def _handshake(self, now: float) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:  # a certificate not trusted, a port that does not speak TLS
            self.fail(exc)
        else:
            self.state = OPEN
        self._queue_tx(self._tls_out(), now)
        if self.state == OPEN:
            self._tls_read()
        self._flush(now)

    def _tls_read(self) -> None:
        assert self.tls is not None
        while True:
            try:
                data = self.tls.read(IO_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.rx_end = _EOF
                break
            except ssl.SSLError as exc:
                self.rx_end = exc
                break
            if not data:
                self.rx_end = _EOF
                break
            self.rx_ready += data
        # TLS 1.3 may answer (a key update)
        out = self._tls_out()
        if out:
            self._queue_tx(out, time.monotonic())


class _Timer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Entry:
    """One link on the loop."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.client: paho.Client = link.client
        self.conn: _Conn | None = None
        self.mask = 0  # the events the selector watches for it; 0: not registered
        self.shaping = link.shaping or Shaping()
        now = time.monotonic()
        self.up = self.shaping.bucket(self.shaping.up_bytes_s, now)
        self.down = self.shaping.bucket(self.shaping.down_bytes_s, now)
        self.backoff: float | None = None  # the last reconnect delay; None: the next is the shortest
        self.accepted = False  # the current connection was accepted (CONNACK)
        self.attempt_at = 0.0
        self.failed_attempts = 0  # in a row: which of the broker's addresses to try next
        self.retry: _Timer | None = None
        self.wake: _Timer | None = None  # a shaped link's next look
        self.deadline: _Timer | None = None  # stop(): the DISCONNECT's last chance
        self.queued = False  # waiting for a connecting slot
        self.connecting = False  # holds one
        self.posted = False  # in the loop's write queue
        self.stopping = False
        self.suspended = False  # suspend(): no connection, no attempts until resume()
        self.detached = threading.Event()


class MqttLoop:
    """One thread serving any number of ``MqttLink``s made with ``loop=`` it
    (see the module docstring). Thread-safe: links attach, publish and stop
    from any thread."""

    def __init__(self, *, tick_s: float = 1.0, max_connecting: int = 64, jitter: float = 0.25,
                 name: str = "fedge-mqtt-loop") -> None:
        self.tick_s = tick_s
        self.max_connecting = max_connecting
        self.jitter = jitter
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, READ, None)
        self._woken = False
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._writes: collections.deque[_Entry] = collections.deque()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._entries: dict[MqttLink, _Entry] = {}
        self._connect_queue: collections.deque[_Entry] = collections.deque()
        self._connecting = 0
        self._resolved: dict[tuple[str, int], tuple[float, Any]] = {}
        # keepalive ticks: this cycle's links, how far through them, and when it began
        self._cycle: list[_Entry] = []
        self._cycle_i = 0
        self._cycle_start = 0.0
        self._lock = threading.Lock()
        self._count = 0  # links attached or being attached
        self._budget = 0  # links the descriptor limit was checked for
        self._thread: threading.Thread | None = None
        self._running = False
        # what happened, for tests and benchmarks
        self.attempts = 0
        self.accepted = 0
        self.drops = 0

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._running = True
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every link still attached (cleanly, all at once, within
        ``timeout``) and the thread."""
        links = list(self._entries)
        for link in links:
            link.stop(timeout=timeout, wait=False)
        deadline = time.monotonic() + timeout + 5.0
        for link in links:
            if not self.in_loop_thread():
                link.detached.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            thread, self._thread = self._thread, None
            self._running = False
        if thread is not None:
            self._wake()
            if thread is not threading.current_thread():
                thread.join(timeout)
        with contextlib.suppress(Exception):
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def thread_native_id(self) -> int | None:
        """The loop thread's kernel id (None before it started or once it stopped)."""
        thread = self._thread
        return thread.native_id if thread is not None and thread.is_alive() else None

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def __len__(self) -> int:
        return len(self._entries)

    def reserve(self, links: int) -> None:
        """Check (and raise, if it can) the descriptor limit for ``links``
        more links; ``DescriptorLimitError`` when it cannot."""
        with self._lock:
            wanted = self._count + links
            if wanted <= self._budget:
                return
        limit = ensure_descriptors(wanted)
        with self._lock:
            self._budget = max(self._budget, limit - DESCRIPTOR_MARGIN)

    # --- links -------------------------------------------------------------------------

    def attach(self, link: MqttLink) -> None:
        """Start driving ``link`` (its ``start()`` calls this, after ``connect_async``)."""
        self.reserve(1)
        with self._lock:
            self._count += 1
        entry = _Entry(link)
        self._install(entry)
        self._call_soon(lambda: self._attach(entry))
        self.start()

    def _install(self, entry: _Entry) -> None:
        """paho's socket callbacks (and how it opens one) go to the loop, for ``entry``."""
        c = entry.client
        c.on_socket_open = lambda client, userdata, sock: self._opened(entry, sock)
        c.on_socket_close = lambda client, userdata, sock: self._closed(entry, sock)
        c.on_socket_register_write = lambda client, userdata, sock: self._post_write(entry)
        c.on_socket_unregister_write = lambda client, userdata, sock: self._unregistered_write(entry)
        c.socket_factory = lambda: self._open(entry)  # type: ignore[attr-defined]
        c.loop_entry = entry  # type: ignore[attr-defined]

    def detach(self, link: MqttLink, timeout: float = 5.0, wait: bool = True) -> threading.Event:
        """Disconnect ``link`` cleanly (its DISCONNECT sent within
        ``timeout``, else the connection is just closed) and forget it.
        Waits for that (unless called on the loop's thread or ``wait`` is
        false); the event returned is set once it is done."""
        done = threading.Event()
        self._call_soon(lambda: self._detach(link, time.monotonic() + timeout, done))
        if wait and not self.in_loop_thread():
            done.wait(timeout + 5.0)
        return done

    def shape(self, link: MqttLink, shaping: Shaping) -> None:
        """Change ``link``'s simulated network (rates now, delay from its next connection)."""
        link.shaping = shaping

        def apply() -> None:
            entry = self._entries.get(link)
            if entry is None:
                return
            now = time.monotonic()
            entry.shaping = shaping
            entry.up = shaping.bucket(shaping.up_bytes_s, now)
            entry.down = shaping.bucket(shaping.down_bytes_s, now)
            if entry.conn is not None:
                entry.conn.up, entry.conn.down = entry.up, entry.down
                self._service(entry, now)

        self._call_soon(apply)

    def drop(self, link: MqttLink) -> None:
        """Break ``link``'s connection as a network failure would (no
        DISCONNECT: the broker publishes its last will); it reconnects after
        its backoff."""

        def cut() -> None:
            entry = self._entries.get(link)
            if entry is not None and entry.conn is not None:
                entry.conn.fail(ConnectionResetError(errno.ECONNRESET, "connection dropped (simulated)"))
                entry.conn.error_told = True  # not a failed attempt
                self._guard(entry, entry.client.loop_read)

        self._call_soon(cut)

    def suspend(self, link: MqttLink) -> None:
        """Take ``link`` off the network as a device losing power or coverage
        would: the connection is broken without DISCONNECT (the broker
        publishes its last will) and no attempt is made until ``resume``.
        What the link publishes meanwhile is queued as while any outage."""

        def cut() -> None:
            entry = self._entries.get(link)
            if entry is None or entry.suspended:
                return
            entry.suspended = True
            if entry.retry is not None:
                entry.retry.cancel()
                entry.retry = None
            if entry.conn is not None:
                entry.conn.fail(ConnectionResetError(errno.ECONNRESET, "off the network (simulated)"))
                entry.conn.error_told = True  # not a failed attempt
                self._guard(entry, entry.client.loop_read)

        self._call_soon(cut)

    def resume(self, link: MqttLink) -> None:
        """Back on the network after ``suspend``: it connects at once."""

        def back() -> None:
            entry = self._entries.get(link)
            if entry is None or not entry.suspended:
                return
            entry.suspended = False
            entry.backoff = None
            entry.failed_attempts = 0
            self._queue_attempt(entry)

        self._call_soon(back)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread (soon, in order with other calls)."""
        self._call_soon(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread ``delay`` seconds from now."""
        when = time.monotonic() + delay

        def schedule() -> None:
            self._call_at(when, fn)

        if self.in_loop_thread():
            schedule()
        else:
            self._call_soon(schedule)

    # --- called from other threads -------------------------------------------------------

    def _call_soon(self, fn: Callable[[], None]) -> None:
        self._commands.append(fn)
        if not self.in_loop_thread():
            self._wake()

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _post_write(self, entry: _Entry) -> None:
        """paho has a packet to send (from any thread)."""
        if entry.posted:
            return
        entry.posted = True
        self._writes.append(entry)
        if not self.in_loop_thread():
            self._wake()

    def _unregistered_write(self, entry: _Entry) -> None:
        # paho clears its "registered" flag after it checked its queue: a
        # packet queued by another thread in between was not announced.
        if entry.client.want_write():
            self._post_write(entry)

    # --- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug: say so, loudly, rather than leave every link silent
            log.critical("the MQTT loop %s stopped after an error; its links are no longer served", self.name,
                         exc_info=True)
            raise

    def _serve(self) -> None:
        next_slice = time.monotonic()
        while self._running:
            now = time.monotonic()
            timeout: float | None = None
            if self._commands or self._writes:
                timeout = 0.0
            else:
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - now)
                if self._entries:
                    until = max(0.0, next_slice - now)
                    timeout = until if timeout is None else min(timeout, until)
            try:
                events = self._sel.select(timeout)
            except OSError:  # the selector was closed under us
                break
            now = time.monotonic()
            for key, mask in events:
                entry = key.data
                if entry is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while self._wake_r.recv(4096):
                            pass
                    # after draining: a wake-up sent from now on stays to be seen,
                    # and what was posted before is run below
                    self._woken = False
                    continue
                self._guard(entry, self._on_io, entry, mask, now)
            while self._commands:
                fn = self._commands.popleft()
                try:
                    fn()
                except Exception:
                    log.exception("MQTT loop: a command failed")
            for _ in range(len(self._writes)):
                entry = self._writes.popleft()
                entry.posted = False
                if entry.conn is not None:
                    self._guard(entry, self._service, entry, time.monotonic())
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    try:
                        timer.fn()
                    except Exception:
                        log.exception("MQTT loop: a timer failed")
            if self._connect_queue:
                self._start_attempts()
            if now >= next_slice:
                self._keepalive(now)
                next_slice = now + self.tick_s / SLICES

    def _guard(self, entry: _Entry, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)``: one link's trouble (a bug, a sink that raised)
        breaks its own connection, which then reconnects, not the loop."""
        try:
            fn(*args)
        except Exception:
            log.exception("%s: MQTT loop: closing the connection after an error", entry.link.name)
            with contextlib.suppress(Exception):
                if entry.conn is not None:  # as paho ends a lost connection: closed, then on_disconnect
                    entry.client._loop_rc_handle(paho.MQTT_ERR_CONN_LOST)

    def _call_at(self, when: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def _keepalive(self, now: float) -> None:
        """loop_misc for each link about once per tick, a slice at a time."""
        if self._cycle_i >= len(self._cycle) and now - self._cycle_start >= self.tick_s:
            self._cycle = list(self._entries.values())
            self._cycle_i = 0
            self._cycle_start = now
        due = min(len(self._cycle), int(len(self._cycle) * ((now - self._cycle_start) / self.tick_s + 1 / SLICES)))
        while self._cycle_i < due:
            entry = self._cycle[self._cycle_i]
            self._cycle_i += 1
            if entry.conn is not None and not entry.detached.is_set():
                self._guard(entry, self._tick, entry, now)

    def _tick(self, entry: _Entry, now: float) -> None:
        conn = entry.conn
        c = entry.client
        if conn is None:
            return
        if conn.state in (CONNECTING, HANDSHAKE) and now - entry.attempt_at > c.connect_timeout:
            conn.fail(TimeoutError(errno.ETIMEDOUT, "timed out"))
            self._service(entry, now)
            return
        if conn.state == OPEN:
            c.loop_misc()
            if entry.conn is conn and c.want_write() and not entry.posted and not entry.mask & WRITE \
                    and entry.wake is None:
                self._service(entry, now)

    # --- one link ----------------------------------------------------------------------

    def _attach(self, entry: _Entry) -> None:
        old = self._entries.get(entry.link)
        if old is not None:  # started again before its stop finished
            self._force_close(old)
            self._install(entry)
        self._entries[entry.link] = entry
        self._queue_attempt(entry)

    def _queue_attempt(self, entry: _Entry) -> None:
        entry.retry = None
        if entry.stopping or entry.suspended or entry.queued or entry.conn is not None:
            return
        entry.queued = True
        self._connect_queue.append(entry)

    def _start_attempts(self) -> None:
        while self._connect_queue and self._connecting < self.max_connecting:
            entry = self._connect_queue.popleft()
            entry.queued = False
            if entry.stopping or entry.suspended or entry.conn is not None:
                continue
            self._attempt(entry)

    def _attempt(self, entry: _Entry) -> None:
        self.attempts += 1
        entry.connecting = True
        self._connecting += 1
        entry.accepted = False
        entry.attempt_at = time.monotonic()
        try:
            entry.client.reconnect()  # _Client.reconnect: the link hears of a failure
        except Exception as exc:
            if not isinstance(exc, (OSError, ValueError)):
                log.exception("%s: MQTT loop: connection attempt failed", entry.link.name)
            self._release(entry)
            entry.failed_attempts += 1
            if entry.conn is not None:
                with contextlib.suppress(Exception):
                    entry.client._sock_close()
            self._schedule_retry(entry)

    def _release(self, entry: _Entry) -> None:
        if entry.connecting:
            entry.connecting = False
            self._connecting -= 1

    def _schedule_retry(self, entry: _Entry) -> None:
        if entry.stopping or entry.suspended or entry.retry is not None:
            return
        settings = entry.link.settings
        lo, hi = settings.reconnect_min_s, settings.reconnect_max_s
        entry.backoff = lo if entry.backoff is None else min(entry.backoff * 2, hi)
        delay = min(entry.backoff * (1 + random.random() * self.jitter), hi) if self.jitter else entry.backoff
        entry.retry = self._call_at(time.monotonic() + max(delay, lo), lambda: self._queue_attempt(entry))

    def _open(self, entry: _Entry) -> _Conn:
        """paho's ``_create_socket`` for this link: a non-blocking connect."""
        c = entry.client
        host, port = c._host, c._port
        addresses = self._resolve(host, port)
        family, addr = addresses[entry.failed_attempts % len(addresses)]  # as create_connection tries each
        raw = socket.socket(family, socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            err = raw.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(err, os.strerror(err))
            tls = incoming = outgoing = None
            if c._ssl:
                context = c._ssl_context
                if context is None:
                    raise ValueError("TLS without an SSL context")
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        conn = _Conn(raw, tls, incoming, outgoing, entry.up, entry.down, entry.shaping.delay_s)
        entry.conn = conn
        return conn

    def _resolve(self, host: str, port: int) -> list[tuple[int, Any]]:
        now = time.monotonic()
        cached = self._resolved.get((host, port))
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], OSError):
                raise cached[1]
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._resolved[(host, port)] = (now + RESOLVE_FAIL_TTL_S, exc)
            raise
        addresses: list[tuple[int, Any]] = [(family, addr) for family, _, _, _, addr in infos]
        self._resolved[(host, port)] = (now + RESOLVE_TTL_S, addresses)
        return addresses

    def _opened(self, entry: _Entry, sock: Any) -> None:
        if entry.retry is not None:
            entry.retry.cancel()
            entry.retry = None
        self._register(entry, WRITE)

    def _register(self, entry: _Entry, mask: int) -> None:
        conn = entry.conn
        if conn is None or mask == entry.mask:
            return
        if not mask:
            self._sel.unregister(conn.fd)
        elif not entry.mask:
            stale = self._sel.get_map().get(conn.fd)
            if stale is not None:  # a closed socket's descriptor, reused
                self._sel.unregister(conn.fd)
            self._sel.register(conn.fd, mask, entry)
        else:
            self._sel.modify(conn.fd, mask, entry)
        entry.mask = mask

    def _closed(self, entry: _Entry, sock: Any) -> None:
        """paho is about to close the connection's socket."""
        if not self.in_loop_thread() and self._thread is not None:
            # never happens in practice (the loop's thread does everything); be safe
            self._call_soon(lambda: self._closed(entry, sock))
            return
        conn = entry.conn
        if conn is not None and conn is sock:
            if entry.mask:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(conn.fd)
            entry.mask = 0
            entry.conn = None
        if entry.wake is not None:
            entry.wake.cancel()
            entry.wake = None
        self._release(entry)
        if entry.accepted:
            self.drops += 1
            entry.backoff = None  # it was connected: the next try waits the shortest delay
            entry.accepted = False
            entry.failed_attempts = 0
        else:
            entry.failed_attempts += 1
        if entry.stopping:
            self._finish(entry)
        else:
            self._schedule_retry(entry)

    def _on_io(self, entry: _Entry, mask: int, now: float) -> None:
        conn = entry.conn
        if conn is None:
            return
        if conn.state == CONNECTING:
            conn.finish_connect(now)
        elif not conn.direct:
            if mask & READ:
                conn.on_readable(now)
            if mask & WRITE:
                conn.on_writable(now)
        self._service(entry, now, readable=bool(mask & READ))

    def _service(self, entry: _Entry, now: float, readable: bool = False) -> None:
        """Let paho read what there is and write what it has; then wait for what is next."""
        conn = entry.conn
        c = entry.client
        if conn is None:
            return
        if conn.error is not None and not conn.error_told:
            # The attempt failed before paho could see why: the link hears the
            # cause (refused, TLS, timeout), then paho the error, which closes.
            conn.error_told = True
            if conn.state != OPEN or not entry.accepted:
                on_attempt = getattr(c, "on_attempt", None)
                if on_attempt is not None:
                    on_attempt(conn.error)
            c.loop_read()
            return
        if conn.state == OPEN:
            if entry.connecting:
                # the TCP connection (and TLS handshake) is made: the slot is
                # for what loads the broker's listen queue and CPU, not for
                # waiting out a simulated delay until CONNACK
                self._release(entry)
            if conn.direct:
                if readable:
                    conn.starved = False
                    c.loop_read()
            else:
                for _ in range(64):  # paho reads a few packets per call; a fair share, then the others
                    if entry.conn is not conn or not conn.has_input():
                        break
                    before = conn.consumed
                    conn.starved = False
                    c.loop_read()
                    if conn.starved or conn.consumed == before:
                        break
            if entry.conn is not conn:
                return
            if not entry.accepted and c.is_connected():
                entry.accepted = True
                entry.backoff = None
                self.accepted += 1
            if c.want_write():
                conn.blocked = ""
                c.loop_write()
                if entry.conn is not conn:
                    return
        self._update(entry, now)

    def _update(self, entry: _Entry, now: float) -> None:
        conn = entry.conn
        if conn is None:
            return
        mask, wake = conn.interest(entry.client.want_write(), now)
        self._register(entry, mask)
        if wake is not None and (entry.wake is None or entry.wake.cancelled or wake < entry.wake.when):
            if entry.wake is not None:
                entry.wake.cancel()
            entry.wake = self._call_at(wake, lambda: self._woken_up(entry))

    def _woken_up(self, entry: _Entry) -> None:
        entry.wake = None
        conn = entry.conn
        if conn is None:
            return
        now = time.monotonic()
        if not conn.direct:
            conn.advance(now)
        self._guard(entry, self._service, entry, now, conn.direct)

    # --- stopping ------------------------------------------------------------------------

    def _detach(self, link: MqttLink, deadline: float, done: threading.Event) -> None:
        entry = self._entries.get(link)
        if entry is None:
            done.set()
            return
        entry.stopping = True
        entry.detached = done
        if entry.retry is not None:
            entry.retry.cancel()
            entry.retry = None
        c = entry.client
        conn = entry.conn
        if conn is None:
            c.disconnect()  # no connection: paho just notes it is disconnected
            self._finish(entry)
            return
        if conn.state != OPEN or not entry.accepted or conn.error is not None:
            self._force_close(entry)
            return
        c.disconnect()  # queues the DISCONNECT; paho closes the socket once it is sent
        self._guard(entry, self._service, entry, time.monotonic())
        if entry.link in self._entries and self._entries[entry.link] is entry:
            entry.deadline = self._call_at(deadline, lambda: self._force_close(entry))

    def _force_close(self, entry: _Entry) -> None:
        if entry.conn is None:
            self._finish(entry)
            return
        was = entry.accepted
        with contextlib.suppress(Exception):
            entry.client._sock_close()  # -> _closed -> _finish
        if was:
            with contextlib.suppress(Exception):
                entry.client._do_on_disconnect(packet_from_broker=False, v1_rc=paho.MQTT_ERR_SUCCESS)
        self._finish(entry)

    def _finish(self, entry: _Entry) -> None:
        if self._entries.get(entry.link) is entry:
            del self._entries[entry.link]
            with self._lock:
                self._count -= 1
        for timer in (entry.retry, entry.wake, entry.deadline):
            if timer is not None:
                timer.cancel()
        entry.stopping = True
        self._release(entry)
        c = entry.client
        if entry.conn is not None:  # only if paho's close failed
            with contextlib.suppress(KeyError, ValueError, OSError):
                if entry.mask:
                    self._sel.unregister(entry.conn.fd)
            entry.conn.close()
            entry.conn = None
        if getattr(c, "loop_entry", None) is entry:  # not yet another entry's (started again)
            c.on_socket_open = None
            c.on_socket_close = None
            c.on_socket_register_write = None
            c.on_socket_unregister_write = None
            c.socket_factory = None  # type: ignore[attr-defined]
            c.loop_entry = None  # type: ignore[attr-defined]
        entry.detached.set()
