"""The envelope every fedge payload travels in.

Owns the byte layout of one message and nothing else: no topics, no MQTT, no
meaning of header fields (that is ``fedge.messages``). Decoding never trusts a
length it has not bounded first, and never unpickles anything.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"FEDG"
    4       1     wire version (this build speaks 1)
    5       1     kind (``Kind``)
    6       2     flags (reserved, 0)
    8       4     header length H
    12      8     body length B
    20      32    sha256 over bytes 0..19, the header and the body
    52      H     header: UTF-8 JSON object
    52+H    B     body: opaque bytes (safetensors for tensors)
    52+H+B  96    only with flag SIGNED: the signer's Ed25519 public key (32)
                  and its signature over the digest (64), see fedge.identity

The digest covers every byte but itself and the signature trailer, so a
flipped bit anywhere (kind, flags, lengths, header, body) or a truncated
message is caught before anyone acts on it. The signature, over the digest,
says who made the message; this module only carries it (``Envelope.signer``,
``Envelope.signature``): whether it verifies, and whether the signer is
trusted, is ``fedge.identity``'s business. The digest also names the message: a device verifies the global model
it received against the digest the round announcement carries.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from fedge.errors import FedgeError

MAGIC = b"FEDG"
WIRE_VERSION = 1
PREAMBLE = struct.Struct("<4sBBHIQ32s")
_COVERED = 20  # preamble bytes before the digest
FLAG_SIGNED = 0x0001
SIGNATURE_TRAILER = 96  # public key (32) + Ed25519 signature (64)
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 1 << 30


class Kind(enum.IntEnum):
    MODEL = 1
    ROUND = 2
    UPDATE = 3
    DECLINE = 4
    STATUS = 5
    ACK = 6
    EVENT = 7
    ARTIFACT = 8
    MODEL_DELTA = 9
    KEYS = 10  # the aggregator's key rotations (fedge.messages.KeyChain)
    SECAGG = 11  # a secure-aggregation stage (fedge.messages.SecAggStage)
    DEVICE = 12  # the aggregator's record of one device (fedge.messages.DeviceRecord)
    INVITE = 13  # a device selected for a round too large to list (fedge.messages.Invite)
    PARTIAL = 14  # a relay's sum of its region's updates for one round (fedge.messages.RegionSum)
    # Local only: between the agent and its training worker process.
    TRAIN_REQUEST = 32
    TRAIN_RESULT = 33
    TRAIN_ERROR = 34
    TRAIN_BATCH = 35  # many devices' rounds from one global model, answered item by item (edge_agent.worker)


class WireError(FedgeError):
    """A payload that is not a well-formed fedge message. ``reason`` is a short
    machine-friendly tag used for counters; ``str(err)`` is the log line."""


class Signer(Protocol):
    """What signs a message (``fedge.identity.Identity``)."""

    @property
    def public_raw(self) -> bytes: ...

    def sign(self, digest: bytes) -> bytes: ...


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    header: dict[str, Any]
    body: bytes
    digest: str  # hex sha256 over the preamble's first 20 bytes, header and body
    signer: bytes = b""  # the signer's raw public key, for a signed message
    signature: bytes = b""

    @property
    def signed(self) -> bool:
        return bool(self.signature)

    @property
    def size(self) -> int:
        return PREAMBLE.size + len(_header_bytes(self.header)) + len(self.body) + (
            SIGNATURE_TRAILER if self.signed else 0)


def _header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def encode(kind: Kind, header: dict[str, Any], body: bytes = b"", signer: Signer | None = None) -> bytes:
    """Build one message, signed by ``signer`` if given. ``header`` must be
    JSON-serialisable (no NaN)."""
    hb = _header_bytes(header)
    if len(hb) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(hb)} bytes; the limit is {MAX_HEADER_BYTES}")
    flags = FLAG_SIGNED if signer is not None else 0
    fixed = PREAMBLE.pack(MAGIC, WIRE_VERSION, int(kind), flags, len(hb), len(body), bytes(32))[:_COVERED]
    h = hashlib.sha256(fixed)
    h.update(hb)
    h.update(body)
    digest = h.digest()
    parts = [fixed, digest, hb, body]
    if signer is not None:
        parts += [signer.public_raw, signer.sign(digest)]
    return b"".join(parts)


def seal(message: bytes, signer: Signer) -> bytes:
    """``message`` (well-formed, unsigned) signed by ``signer``: the flag set,
    the digest computed again over it, the trailer appended. The header and
    body bytes are kept as they are."""
    if len(message) < PREAMBLE.size or message[:4] != MAGIC:
        raise WireError("malformed", "not a fedge message (bad magic)")
    magic, version, kind, flags, hlen, blen, _digest = PREAMBLE.unpack_from(message, 0)
    if flags & FLAG_SIGNED:
        raise ValueError("message is already signed")
    if len(message) != PREAMBLE.size + hlen + blen:
        raise WireError("malformed", "message length does not match its preamble")
    fixed = PREAMBLE.pack(magic, version, kind, flags | FLAG_SIGNED, hlen, blen, bytes(32))[:_COVERED]
    view = memoryview(message)[PREAMBLE.size:]
    h = hashlib.sha256(fixed)
    h.update(view)
    digest = h.digest()
    return b"".join((fixed, digest, view, signer.public_raw, signer.sign(digest)))


def digest_of(message: bytes) -> str:
    """The digest a well-formed message claims, without verifying it."""
    if len(message) < PREAMBLE.size or message[:4] != MAGIC:
        raise WireError("malformed", "not a fedge message (bad magic)")
    return message[20:52].hex()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a header")


def peek(message: bytes) -> tuple[Kind, dict[str, Any]] | None:
    """Kind and header of a message, unverified: for accounting and logs only,
    never for decisions (``decode`` checks the digest)."""
    try:
        _m, _v, kind, _f, hlen, _b, _d = PREAMBLE.unpack_from(message, 0)
        header = json.loads(bytes(message[PREAMBLE.size : PREAMBLE.size + min(hlen, MAX_HEADER_BYTES)]))
        return Kind(kind), header if isinstance(header, dict) else {}
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def decode(message: bytes, *, max_body: int = DEFAULT_MAX_BODY_BYTES) -> Envelope:
    """Parse and verify one message; raise ``WireError`` naming the problem."""
    n = len(message)
    if n < PREAMBLE.size:
        raise WireError("truncated", f"message is {n} bytes, shorter than the {PREAMBLE.size}-byte preamble")
    magic, version, kind, flags, hlen, blen, digest = PREAMBLE.unpack_from(message, 0)
    if magic != MAGIC:
        raise WireError("malformed", f"not a fedge message (magic {magic!r}, expected {MAGIC!r})")
    if version != WIRE_VERSION:
        raise WireError(
            "version",
            f"wire version {version} is not supported (this build speaks {WIRE_VERSION}); "
            "run the same fedge release on agent and aggregator",
        )
    try:
        kind = Kind(kind)
    except ValueError:
        raise WireError("malformed", f"unknown message kind {kind}") from None
    if flags & ~FLAG_SIGNED:
        raise WireError("malformed", f"unknown flags {flags:#06x} (this build knows only SIGNED, {FLAG_SIGNED:#06x})")
    trailer = SIGNATURE_TRAILER if flags & FLAG_SIGNED else 0
    if hlen > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header claims {hlen} bytes; the limit is {MAX_HEADER_BYTES}")
    if blen > max_body:
        raise WireError("oversized", f"body claims {blen} bytes; the limit is {max_body}")
    expected = PREAMBLE.size + hlen + blen + trailer
    if n != expected:
        what = "truncated" if n < expected else "malformed"
        raise WireError(what, f"message is {n} bytes but its preamble describes {expected}")
    view = memoryview(message)
    end = n - trailer
    hb = view[PREAMBLE.size : PREAMBLE.size + hlen]
    body_view = view[PREAMBLE.size + hlen : end]
    h = hashlib.sha256(view[:_COVERED])
    h.update(hb)
    h.update(body_view)
    if h.digest() != digest:
        raise WireError("checksum", "sha256 mismatch: the message was corrupted or truncated in transit")
    try:
        header = json.loads(bytes(hb), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("malformed", f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("malformed", "header is not a JSON object")
    body = message[PREAMBLE.size + hlen : end] if blen else b""
    signer, signature = (bytes(view[end : end + 32]), bytes(view[end + 32 :])) if trailer else (b"", b"")
    return Envelope(kind=kind, header=header, body=body, digest=digest.hex(), signer=signer, signature=signature)
