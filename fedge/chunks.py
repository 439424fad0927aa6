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
chunks complete the same buffer instead of starting a new one. A message may
complete more than once (a resend after it was delivered); the layers above
are idempotent, and a stray duplicate chunk only holds a bounded buffer until
it expires.

Buffers are bounded: in bytes across all partial messages, in bytes per
message, in partial messages per stream, and in time. A lost chunk therefore
costs one message, never later ones.
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


@dataclass
class _Partial:
    stream: str
    count: int
    total: int
    started: float
    stride: int = 0  # data bytes per chunk, learnt from any non-final chunk
    buffer: bytearray = field(default_factory=bytearray)
    have: set[int] = field(default_factory=set)
    filled: int = 0
    pending_last: bytes | None = None  # the final chunk, held until the stride is known


class Reassembler:
    """Bounded reassembly of chunked messages.

    ``stream`` names who a chunk came from (a topic or client id): partial
    messages are only ever combined within one stream, so one sender cannot
    complete or spoil another's message.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 64 << 20,
        max_message_bytes: int = 32 << 20,
        max_partials_per_stream: int = 2,
        timeout_s: float = 120.0,
        check_ids: bool = True,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self.max_partials_per_stream = max_partials_per_stream
        self.timeout_s = timeout_s
        # Callers that verify a fedge envelope's digest right after may skip
        # hashing the whole message a second time.
        self.check_ids = check_ids
        self._partials: OrderedDict[tuple[str, bytes], _Partial] = OrderedDict()
        self.reserved = 0
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._partials)

    def feed(self, stream: str, payload: bytes, now: float) -> bytes | None:
        """Add one chunk. Returns the whole message once its last missing
        chunk arrives, else None. Raises ``ChunkError`` for a chunk that is
        malformed or does not fit the buffers (the caller logs and counts)."""
        self.expire(now)
        chunk = parse_chunk(payload)
        key = (stream, chunk.message_id)
        part = self._partials.get(key)
        if part is None:
            part = self._open(key, chunk, now)
        elif chunk.count != part.count or chunk.total != part.total:
            self._drop(key)
            self.counters["inconsistent"] += 1
            raise ChunkError("malformed", "chunks of one message disagree on its size; message dropped")
        if chunk.index in part.have:
            self.counters["duplicate_chunks"] += 1
            return None
        self._place(key, part, chunk)
        if len(part.have) == part.count and part.pending_last is None:
            if part.filled != part.total:
                self._drop(key)
                raise ChunkError("malformed", "chunks do not add up to the announced message length")
            self._drop(key)
            message = bytes(part.buffer)
            if self.check_ids and message_id(message) != chunk.message_id:
                self.counters["bad_message_id"] += 1
                raise ChunkError("checksum", "reassembled message does not match its id; dropped")
            self.counters["messages"] += 1
            return message
        return None

    def discard(self, stream: str) -> None:
        """Drop every partial message of ``stream`` (its sender went away)."""
        for key in [k for k in self._partials if k[0] == stream]:
            self._drop(key)

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

    def _open(self, key: tuple[str, bytes], chunk: Chunk, now: float) -> _Partial:
        if chunk.total > self.max_message_bytes:
            self.counters["oversized"] += 1
            raise ChunkError(
                "oversized", f"message of {chunk.total} bytes exceeds the {self.max_message_bytes}-byte limit"
            )
        if chunk.count > max(1, chunk.total):
            raise ChunkError("malformed", f"{chunk.count} chunks for a {chunk.total}-byte message")
        same_stream = [k for k in self._partials if k[0] == key[0]]
        while len(same_stream) >= self.max_partials_per_stream:
            self._drop(same_stream.pop(0))
            self.counters["superseded"] += 1
        if self.reserved + chunk.total > self.max_bytes:
            self.counters["overflow"] += 1
            raise ChunkError(
                "overflow",
                f"reassembly buffers full ({self.reserved} of {self.max_bytes} bytes in use); message dropped",
            )
        part = _Partial(stream=key[0], count=chunk.count, total=chunk.total, started=now)
        part.buffer = bytearray(chunk.total)
        self._partials[key] = part
        self.reserved += chunk.total
        return part

    def _place(self, key: tuple[str, bytes], part: _Partial, chunk: Chunk) -> None:
        last = chunk.index == part.count - 1
        if part.count == 1:
            self._write(key, part, 0, chunk.data)
        elif not last:
            if part.stride == 0:
                part.stride = len(chunk.data)
            elif len(chunk.data) != part.stride:
                self._drop(key)
                raise ChunkError("malformed", "chunks of one message have different sizes; message dropped")
            self._write(key, part, chunk.index * part.stride, chunk.data)
        else:
            part.pending_last = bytes(chunk.data)
        part.have.add(chunk.index)
        if part.pending_last is not None and part.stride:
            pending, part.pending_last = part.pending_last, None
            self._write(key, part, (part.count - 1) * part.stride, pending)

    def _write(self, key: tuple[str, bytes], part: _Partial, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if end > part.total:
            self._drop(key)
            raise ChunkError("malformed", "chunk extends past the announced message length; message dropped")
        part.buffer[offset:end] = data
        part.filled += len(data)

    def _drop(self, key: tuple[str, bytes]) -> None:
        part = self._partials.pop(key, None)
        if part is not None:
            self.reserved -= part.total
