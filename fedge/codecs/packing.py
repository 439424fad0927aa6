"""Bit-level packing the codecs share: signed low-bit integers packed into
bytes, and sorted indices as LEB128 varint gaps or a bitmap. Vectorised
NumPy, no Python loops over elements; every decoder checks counts and
ranges, because its input came from the network.
"""

from __future__ import annotations

import numpy as np

from fedge.codecs.base import CodecError


def levels(bits: int) -> int:
    """Largest magnitude of a signed ``bits``-bit code: 127, 7 or 1."""
    return (1 << (bits - 1)) - 1


def pack_signed(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [-L, L] (L = levels(bits)) as ``bits``-bit fields, 8/bits per byte."""
    if bits == 8:
        return q.astype(np.int8).view(np.uint8)
    per = 8 // bits
    u = (q.astype(np.int16) + levels(bits)).astype(np.uint8)  # offset binary: 0 .. 2L
    pad = (-len(u)) % per
    if pad:
        u = np.concatenate([u, np.zeros(pad, np.uint8)])
    u = u.reshape(-1, per)
    out = np.zeros(len(u), np.uint8)
    for j in range(per):
        out |= u[:, j] << (j * bits)
    return out


def unpack_signed(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_signed``; int8 values in [-L, L]."""
    if bits == 8:
        if len(packed) != count:
            raise CodecError("shape", f"expected {count} int8 values, got {len(packed)}")
        return packed.view(np.int8)
    per = 8 // bits
    if len(packed) != -(-count // per):
        raise CodecError("shape", f"expected {-(-count // per)} packed bytes for {count} values, got {len(packed)}")
    mask = (1 << bits) - 1
    fields = np.empty((len(packed), per), np.uint8)
    for j in range(per):
        fields[:, j] = (packed >> (j * bits)) & mask
    values = fields.reshape(-1)[:count]
    if values.size and np.max(values) > 2 * levels(bits):
        raise CodecError("malformed", f"{bits}-bit code outside [-{levels(bits)}, {levels(bits)}]")
    return (values - np.uint8(levels(bits))).view(np.int8)  # wraps to [-L, L]


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as LEB128 varints (7 bits a byte, high bit = more)."""
    v = values.astype(np.uint64)
    n = np.ones(len(v), np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        n += rest > 0
        rest >>= np.uint64(7)
    out = np.empty(int(n.sum()), np.uint8)
    starts = np.cumsum(n) - n
    for j in range(int(np.max(n)) if len(n) else 0):
        sel = n > j
        byte = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (n[sel] > j + 1).astype(np.uint8) << 7
        out[starts[sel] + j] = byte | more
    return out


def varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    """Exactly ``count`` varints filling ``data``; uint64."""
    if count == 0:
        if len(data):
            raise CodecError("malformed", "varint data without values")
        return np.zeros(0, np.uint64)
    ends = np.flatnonzero(data < 0x80)
    if len(ends) != count or ends[-1] != len(data) - 1:
        raise CodecError("malformed", f"varint data holds {len(ends)} values, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 9:
        raise CodecError("malformed", "varint longer than 9 bytes")
    out = np.zeros(count, np.uint64)
    for j in range(int(lengths.max())):
        sel = lengths > j
        out[sel] |= (data[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def indices_encode(idx: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Sorted unique flat indices as (bytes, mode): gap varints (mode 0) or a
    bitmap (mode 1), whichever is smaller."""
    gaps = np.diff(idx, prepend=-1) - 1
    as_varint = varint_encode(gaps)
    bitmap_bytes = -(-size // 8)
    if len(as_varint) <= bitmap_bytes:
        return as_varint, 0
    mask = np.zeros(size, bool)
    mask[idx] = True
    return np.packbits(mask), 1


def indices_decode(data: np.ndarray, mode: int, count: int, size: int) -> np.ndarray:
    """Inverse of ``indices_encode``: ``count`` strictly increasing indices < ``size``."""
    if mode == 0:
        gaps = varint_decode(data, count)
        if count and int(gaps.max()) >= size:
            raise CodecError("shape", f"index gap outside a tensor of {size} entries")
        idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    elif mode == 1:
        if len(data) != -(-size // 8):
            raise CodecError("shape", "index bitmap has the wrong length")
        idx = np.flatnonzero(np.unpackbits(data, count=size))
        if len(idx) != count:
            raise CodecError("shape", f"index bitmap marks {len(idx)} entries, expected {count}")
    else:
        raise CodecError("malformed", f"unknown index mode {mode}")
    if count and (idx[-1] >= size or idx[0] < 0):
        raise CodecError("shape", f"index outside a tensor of {size} entries")
    return idx
