"""Splitting messages below the broker's packet limit, and putting them back.

Sans-I/O: ``split`` turns bytes into chunk payloads, ``Reassembler.feed``
turns chunk payloads (in any order, with losses and duplicates) back into
messages. The caller owns the clock (``now`` is passed in) and the network.

Why chunk at all: brokers cap packet sizes (AWS IoT Core 128 KB, EMQX 1 MB,
Mosquitto's ``max_packet_size``) and paho does not honour the cap a broker
announces; an oversized publish gets the connection dropped and retried
forever. So every message, even a small one, travels as chunks of at most
``chunk_bytes`` each.

Chunk layout (little-endian)::

    0   4   magic b"FEDC"
    4   1   chunk format version (1)
    5   1   flags (reserved, 0)
    6   16  message id: first 16 bytes of sha256(message)
    22  4   index of this chunk
    26  4   number of chunks
    30  8   total message length
    38  ..  data

The message id is a content hash, so a message sent again (a QoS 1
redelivery, an agent resending after a reconnect) has the same id and its
chunks complete the same partial message instead of starting a new one. A
message may complete more than once (a resend after it was delivered); the
layers above are idempotent.

What is bounded, and how. Nothing is reserved for what a chunk header
announces: a partial message holds the chunks that arrived, each stored as
it came, and they are joined once the last one is in. So memory grows with
bytes received, never with totals claimed.

- Each message: a total above ``max_message_bytes`` is refused at its first
  chunk ("oversized"); otherwise the chunks held never add up to more than
  the announced total (a chunk reaching past it drops the message).
- Each stream (one sender): at most ``max_partials_per_stream`` partial
  messages, and at most ``max_stream_bytes`` held across them (by default
  ``max_message_bytes``: one message's worth). A chunk that would go past
  either drops the stream's oldest partial messages ("superseded"); a
  message that alone would exceed ``max_stream_bytes`` is dropped
  ("stream_full").
- All streams: at most ``max_bytes`` held. A chunk that would go past it
  makes room by dropping the oldest partial message of whichever stream
  holds the most ("evicted"), but only while that stream holds more than
  the chunk's own stream would; otherwise the chunk is refused
  ("overflow"): its stream is the greediest. This is longest-queue drop:
  the sender holding the most loses its partial messages first, a sender is
  refused only when it would itself hold the most, and with N senders
  holding data each can count on about ``max_bytes / N``. (Finding that
  sender scans the streams, only while the buffers are full.) A chunk that
  completes its message is never refused for room, since completing
  releases what the message held.
- Time: a partial message is dropped ``timeout_s`` after its first chunk
  ("expired"). A lost chunk therefore costs one message, never later ones.

``held`` counts the data bytes of the chunks held, with a floor: every
chunk but a message's last counts as at least ``MIN_CHUNK_DATA`` bytes (the
smallest chunk fedge sends), and every partial message as at least
``MIN_CHUNK_DATA`` in all. Python spends about 120 bytes of bookkeeping on
each chunk held and about 1 KiB on each partial message, so without the
floor a sender of one-byte chunks would hold a hundred times what it is
charged; with it, memory stays within about 1.15 times ``held`` (plus the
one message being joined), while a message that fedge split is charged
exactly its bytes once it holds 1 KiB.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from fedge.errors import FedgeError

CHUNK_MAGIC = b"FEDC"
CHUNK_VERSION = 1
CHUNK_HEADER = struct.Struct("<4sBB16sIIQ")
# Room for the MQTT fixed header, topic and properties inside one packet.
PACKET_OVERHEAD = 1024
MIN_CHUNK_DATA = 1024


class ChunkError(FedgeError):
    """A chunk stream that cannot be reassembled (``reason``: a counter tag)."""


def chunk_data_size(max_packet_bytes: int) -> int:
    """Bytes of message data per chunk so that a whole MQTT packet stays
    within ``max_packet_bytes``."""
    size = max_packet_bytes - PACKET_OVERHEAD - CHUNK_HEADER.size
    if size < MIN_CHUNK_DATA:
        raise ValueError(
            f"max_packet_bytes={max_packet_bytes} is too small; use at least "
            f"{MIN_CHUNK_DATA + PACKET_OVERHEAD + CHUNK_HEADER.size}"
        )
    return size


def message_id(message: bytes) -> bytes:
    return hashlib.sha256(message).digest()[:16]


def split(message: bytes, data_size: int) -> list[bytes]:
    """Chunk payloads for ``message``; each carries at most ``data_size`` bytes."""
    if data_size <= 0:
        raise ValueError("data_size must be positive")
    mid = message_id(message)
    total = len(message)
    count = max(1, -(-total // data_size))
    view = memoryview(message)
    out = []
    for i in range(count):
        head = CHUNK_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, 0, mid, i, count, total)
        out.append(head + view[i * data_size : (i + 1) * data_size])
    return out


@dataclass(frozen=True)
class Chunk:
    message_id: bytes
    index: int
    count: int
    total: int
    data: memoryview


def parse_chunk(payload: bytes) -> Chunk:
    if len(payload) < CHUNK_HEADER.size:
        raise ChunkError("malformed", f"chunk is {len(payload)} bytes, shorter than its header")
    magic, version, _flags, mid, index, count, total = CHUNK_HEADER.unpack_from(payload, 0)
    if magic != CHUNK_MAGIC:
        raise ChunkError("malformed", "not a fedge chunk (bad magic)")
    if version != CHUNK_VERSION:
        raise ChunkError("version", f"chunk format {version} is not supported (this build speaks {CHUNK_VERSION})")
    if count == 0 or index >= count:
        raise ChunkError("malformed", f"chunk index {index} out of range for {count} chunks")
    data = memoryview(payload)[CHUNK_HEADER.size :]
    if count > 1 and index < count - 1 and len(data) == 0:
        raise ChunkError("malformed", "empty chunk in the middle of a message")
    return Chunk(mid, index, count, total, data)


def _kept(data: memoryview) -> bytes | memoryview:
    """A chunk's data to hold until its message is whole: the view itself
    when it is into immutable bytes (a received payload: no copy), else a
    copy (a buffer its owner may reuse)."""
    return data if isinstance(data.obj, bytes) else bytes(data)


@dataclass(eq=False)
class _Partial:
    stream: str
    message_id: bytes
    count: int
    total: int
    started: float
    stride: int = 0  # data bytes per chunk but the last, learnt from the first such chunk
    last_size: int = -1  # data bytes of the final chunk, once it arrived
    pieces: dict[int, bytes | memoryview] = field(default_factory=dict)
    data: int = 0  # data bytes in ``pieces``
    charge: int = 0  # what this message counts against the bounds (see the module docstring)

    def charge_with(self, index: int, size: int) -> int:
        """The charge once the chunk ``index`` of ``size`` bytes is added."""
        nonfinal = len(self.pieces) - (self.last_size >= 0) + (index != self.count - 1)
        stride = self.stride or size
        return max(MIN_CHUNK_DATA, self.data + size + nonfinal * max(0, MIN_CHUNK_DATA - stride))


@dataclass(eq=False)
class _Stream:
    held: int = 0
    partials: dict[bytes, _Partial] = field(default_factory=dict)  # oldest first


class Reassembler:
    """Bounded reassembly of chunked messages.

    ``stream`` names who a chunk came from (a topic or client id): partial
    messages are only ever combined within one stream, so one sender cannot
    complete or spoil another's message. The bounds are explained in the
    module docstring.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 64 << 20,
        max_message_bytes: int = 32 << 20,
        max_stream_bytes: int | None = None,
        max_partials_per_stream: int = 2,
        timeout_s: float = 120.0,
        check_ids: bool = True,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self.max_stream_bytes = max_message_bytes if max_stream_bytes is None else max_stream_bytes
        self.max_partials_per_stream = max_partials_per_stream
        self.timeout_s = timeout_s
        # Callers that verify a fedge envelope's digest right after may skip
        # hashing the whole message a second time.
        self.check_ids = check_ids
        self._partials: OrderedDict[tuple[str, bytes], _Partial] = OrderedDict()  # oldest first
        self._streams: dict[str, _Stream] = {}
        self._held = 0
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._partials)

    @property
    def held(self) -> int:
        """Bytes held in partial messages, across all streams."""
        return self._held

    @property
    def reserved(self) -> int:
        """Former name of ``held``."""
        return self._held

    def held_by(self, stream: str) -> int:
        """Bytes held in the partial messages of ``stream``."""
        entry = self._streams.get(stream)
        return entry.held if entry is not None else 0

    def feed(self, stream: str, payload: bytes, now: float) -> bytes | None:
        """Add one chunk. Returns the whole message once its last missing
        chunk arrives, else None. Raises ``ChunkError`` for a chunk that is
        malformed or does not fit the bounds (the caller logs and counts)."""
        self.expire(now)
        chunk = parse_chunk(payload)
        key = (stream, chunk.message_id)
        part = self._partials.get(key)
        if part is None:
            self._check_new(chunk)
            part = _Partial(stream, chunk.message_id, chunk.count, chunk.total, now)
        elif chunk.count != part.count or chunk.total != part.total:
            self._drop(key)
            self.counters["inconsistent"] += 1
            raise ChunkError("malformed", "chunks of one message disagree on its size; message dropped")
        if chunk.index in part.pieces:
            self.counters["duplicate_chunks"] += 1
            return None
        self._check_fits(key, part, chunk)
        if len(part.pieces) + 1 == part.count:
            # Completing releases what the message held, so it needs no room.
            self._drop(key)
            part.pieces[chunk.index] = _kept(chunk.data)
            message = b"".join([part.pieces[i] for i in range(part.count)])
            if self.check_ids and message_id(message) != chunk.message_id:
                self.counters["bad_message_id"] += 1
                raise ChunkError("checksum", "reassembled message does not match its id; dropped")
            self.counters["messages"] += 1
            return message
        charge = part.charge_with(chunk.index, len(chunk.data))
        self._make_room(key, part, charge - part.charge)
        self._hold(key, part, chunk, charge)
        return None

    def discard(self, stream: str) -> None:
        """Drop every partial message of ``stream`` (its sender went away)."""
        entry = self._streams.get(stream)
        if entry is not None:
            for mid in list(entry.partials):
                self._drop((stream, mid))

    def expire(self, now: float) -> int:
        """Drop partial messages older than ``timeout_s``; returns how many."""
        dropped = 0
        while self._partials:
            key, part = next(iter(self._partials.items()))
            if now - part.started < self.timeout_s:
                break
            self._drop(key)
            self.counters["expired"] += 1
            dropped += 1
        return dropped

    # --- checks: they raise before anything is held ---------------------------------

    def _check_new(self, chunk: Chunk) -> None:
        if chunk.total > self.max_message_bytes:
            self.counters["oversized"] += 1
            raise ChunkError(
                "oversized", f"message of {chunk.total} bytes exceeds the {self.max_message_bytes}-byte limit"
            )
        if chunk.count > max(1, chunk.total):
            raise ChunkError("malformed", f"{chunk.count} chunks for a {chunk.total}-byte message")

    def _check_fits(self, key: tuple[str, bytes], part: _Partial, chunk: Chunk) -> None:
        """Refuse a chunk that cannot belong to the announced message: once
        the sizes of a middle chunk and the last are known, they must add up
        to the total exactly."""
        size = len(chunk.data)
        final = chunk.index == part.count - 1
        stride = part.stride
        if not final:
            if stride and size != stride:
                self._fail(key, "chunks of one message have different sizes; message dropped")
            stride = size
        last = size if final else part.last_size
        if part.count == 1:
            end = size
        elif stride:
            end = (part.count - 1) * stride + max(last, 0)
        else:
            # Only the last chunk so far; every chunk before it holds a byte at least.
            end = part.count - 1 + size
        if end > part.total:
            self._fail(key, "chunk extends past the announced message length; message dropped")
        if (part.count == 1 or (stride and last >= 0)) and end != part.total:
            self._fail(key, "chunks do not add up to the announced message length; message dropped")

    def _fail(self, key: tuple[str, bytes], reason: str) -> None:
        self._drop(key)
        raise ChunkError("malformed", reason)

    # --- making room ----------------------------------------------------------------

    def _make_room(self, key: tuple[str, bytes], part: _Partial, extra: int) -> None:
        """Drop what must go for ``extra`` more bytes held by ``part``, or
        raise if the chunk bringing them must be refused instead."""
        stream = key[0]
        if part.charge + extra > self.max_stream_bytes:
            self._drop(key)  # it would only ever grow: it can never complete
            self.counters["stream_full"] += 1
            raise ChunkError(
                "stream_full",
                f"one message would hold more than the {self.max_stream_bytes}-byte limit per stream; message dropped",
            )
        new = key not in self._partials
        entry = self._streams.get(stream)
        # The stream's own older messages go first: a sender that starts a
        # new message has given up on them.
        while entry is not None and (
            entry.held + extra > self.max_stream_bytes or (new and len(entry.partials) >= self.max_partials_per_stream)
        ):
            oldest = next(mid for mid in entry.partials if mid != key[1])
            self._drop((stream, oldest))
            self.counters["superseded"] += 1
            entry = self._streams.get(stream)
        while self._held + extra > self.max_bytes:
            own = self.held_by(stream) + extra
            victim = max(self._streams, key=self.held_by, default=None)
            if victim is None or victim == stream or self.held_by(victim) <= own:
                self.counters["overflow"] += 1
                raise ChunkError(
                    "overflow",
                    f"reassembly buffers full ({self._held} of {self.max_bytes} bytes held, "
                    f"{own - extra} by this stream, no other holds more); chunk refused",
                )
            self._drop((victim, next(iter(self._streams[victim].partials))))
            self.counters["evicted"] += 1

    # --- bookkeeping ------------------------------------------------------------------

    def _hold(self, key: tuple[str, bytes], part: _Partial, chunk: Chunk, charge: int) -> None:
        if key not in self._partials:
            self._partials[key] = part
            self._streams.setdefault(key[0], _Stream()).partials[key[1]] = part
        size = len(chunk.data)
        if chunk.index == part.count - 1:
            part.last_size = size
        else:
            part.stride = size
        part.pieces[chunk.index] = _kept(chunk.data)
        part.data += size
        extra = charge - part.charge
        part.charge = charge
        self._streams[key[0]].held += extra
        self._held += extra

    def _drop(self, key: tuple[str, bytes]) -> None:
        part = self._partials.pop(key, None)
        if part is None:
            return
        entry = self._streams[key[0]]
        del entry.partials[key[1]]
        entry.held -= part.charge
        self._held -= part.charge
        if not entry.partials:
            del self._streams[key[0]]
