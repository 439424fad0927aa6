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
        out |= u[:, j] << np.uint8(j * bits)
    return out


def _tables(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For every byte value, its 8/bits fields (low bits first) as signed
    codes: int8 and float32, each (256, 8/bits). A field outside [0, 2L]
    (the all-ones one) is never used, ``check_codes`` refuses it first: it
    maps to L + 1 in int8, to 0 in float32."""
    if bits == 8:
        codes: np.ndarray = np.arange(256, dtype=np.uint8).view(np.int8).reshape(256, 1)
    else:
        per = 8 // bits
        fields = (np.arange(256)[:, None] >> (np.arange(per) * bits)) & ((1 << bits) - 1)
        codes = (fields - levels(bits)).astype(np.int8)
    codes.flags.writeable = False
    floats = codes.astype(np.float32)
    floats[np.abs(floats) > levels(bits) + (bits == 8)] = 0.0  # never used: 0 cannot overflow when scaled
    floats.flags.writeable = False
    return codes, floats


# bits -> (int8 codes, float32 codes) of every byte value: decoding is one gather.
CODE_TABLES = {bits: _tables(bits) for bits in (2, 4, 8)}
# Each field's low bit, for the all-ones test of check_codes.
_LOW_BITS = {2: np.uint64(0x5555555555555555), 4: np.uint64(0x1111111111111111)}


def check_length(packed: np.ndarray, bits: int, count: int) -> None:
    """Raise ``CodecError`` unless ``packed`` (flat uint8) is exactly the
    bytes of ``count`` ``bits``-bit codes."""
    if bits == 8:
        if len(packed) != count:
            raise CodecError("shape", f"expected {count} int8 values, got {len(packed)}")
        return
    per = 8 // bits
    if len(packed) != -(-count // per):
        raise CodecError("shape", f"expected {-(-count // per)} packed bytes for {count} values, got {len(packed)}")


def check_codes(packed: np.ndarray, bits: int, count: int) -> None:
    """Raise ``CodecError`` unless ``packed`` (flat uint8) holds exactly
    ``count`` ``bits``-bit codes, each within [-L, L] (the padding fields of
    the last byte are not codes and are not looked at)."""
    check_length(packed, bits, count)
    if not codes_in_range([(packed, count)], bits):
        raise CodecError("malformed", f"{bits}-bit code outside [-{levels(bits)}, {levels(bits)}]")


def codes_in_range(tensors: list[tuple[np.ndarray, int]], bits: int) -> bool:
    """Whether every code of every (packed, count) is within [-L, L] (the
    lengths checked before), in one pass over all of them. 2L + 1 =
    2^bits - 1 is the only field value outside [0, 2L]: all its bits set."""
    if bits == 8:
        return True
    per = 8 // bits
    used = [(p, count) for p, count in tensors if count]
    if not used:
        return True
    total = sum(len(p) for p, _ in used)
    # One buffer of whole 64-bit words (zero bytes after the codes: valid fields).
    buf = np.zeros(-(-total // 8) * 8, np.uint8)
    end = 0
    for p, count in used:
        buf[end : end + len(p)] = p
        end += len(p)
        rem = count % per
        if rem:  # the last byte's padding fields are not codes: cleared (a zero field is a valid code)
            buf[end - 1] &= (1 << (bits * rem)) - 1
    words = buf.view(np.uint64)
    ones = words >> np.uint64(1)
    for shift in range(2, bits):
        np.bitwise_and(ones, words >> np.uint64(shift), out=ones)
    np.bitwise_and(ones, words, out=ones)
    np.bitwise_and(ones, _LOW_BITS[bits], out=ones)
    return not ones.any()


def unpack_signed(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_signed``; int8 values in [-L, L]."""
    check_codes(packed, bits, count)
    if bits == 8:
        return packed.view(np.int8)
    return unpack_checked(packed, bits, count)


def unpack_checked(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``unpack_signed`` of codes ``check_codes`` has passed: one gather of
    every byte's fields."""
    if bits == 8:
        return packed.view(np.int8)
    table = CODE_TABLES[bits][0]
    return np.take(table, packed, axis=0, mode="wrap").reshape(-1)[:count]


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
