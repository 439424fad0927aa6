"""Stochastically rounded low-bit deltas: ``int8``, ``int4`` and ``int2``.

QSGD-style (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding"). With L = 2^(bits-1) - 1 levels each
side (127, 7 or 1: int2 is ternary), a scale s = max|x| / L per tensor or per
``block`` consecutive entries, and u ~ U[0, 1):

    q = floor(x / s + u)  in [-L, L],   E[q * s] = x,   |x - q * s| < s

so every variant is unbiased and its error is below one step of its own
block. Smaller blocks cost 4 bytes of scale each but track outliers, which
matters most at 2 and 4 bits. Codes are packed 8/bits to a byte.

Parameters: ``{"name": "int4", "block": 256}``; ``block = 0`` means one scale
per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge import tensors
from fedge.codecs.base import CodecError, FoldingCodec, check_shapes, shapes_metadata
from fedge.codecs.packing import levels, pack_signed, unpack_signed
from fedge.tensors import TensorSpec

_BLOCK = 1 << 18  # entries per slice when folding: the float temporary stays in cache


def quantize(x: np.ndarray, bits: int, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flat codes (int8 in [-L, L]) and float32 scales, one per block (or one)."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    n, lv = flat.size, levels(bits)
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    width = block if block and n else max(n, 1)
    nblocks = -(-n // width) if n else 0
    padded = np.zeros(nblocks * width, np.float32)
    padded[:n] = flat
    rows = padded.reshape(nblocks, width)
    absmax = np.abs(rows).max(axis=1) if nblocks else np.zeros(0, np.float32)
    scale = (absmax / lv).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    v = rows / safe[:, None]
    v += rng.random(v.shape, dtype=np.float32)
    np.floor(v, out=v)
    np.clip(v, -lv, lv, out=v)
    return v.reshape(-1)[:n].astype(np.int8), scale


def dequantize_into(out: np.ndarray, codes: np.ndarray, scales: np.ndarray, block: int, factor: float) -> None:
    """``out += factor * codes * scales`` (per block), in cache-sized slices."""
    flat = out.reshape(-1)
    n = flat.size
    if n == 0:
        return
    width = block if block else n
    per_entry_scale = None if len(scales) == 1 else scales
    tmp = np.empty(min(_BLOCK, n), dtype=out.dtype)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        t = tmp[: stop - start]
        if per_entry_scale is None:
            np.multiply(codes[start:stop], np.asarray(factor * float(scales[0]), out.dtype), out=t, dtype=out.dtype)
        else:
            b0, b1 = start // width, -(-stop // width)
            s = np.repeat(per_entry_scale[b0:b1].astype(out.dtype) * np.asarray(factor, out.dtype), width)
            off = start - b0 * width
            np.multiply(codes[start:stop], s[off : off + stop - start], out=t, dtype=out.dtype)
        np.add(flat[start:stop], t, out=flat[start:stop])


class QuantizedCodec(FoldingCodec):
    unbiased = True

    def __init__(self, bits: int = 8, block: int = 0) -> None:
        if bits not in (2, 4, 8):
            raise CodecError("codec", f"quantized codecs have 2, 4 or 8 bits, not {bits}")
        if block < 0 or (block and block % 8):
            raise CodecError("codec", f"block must be 0 (per tensor) or a positive multiple of 8, not {block}")
        self.bits = bits
        self.block = block
        self.name = f"int{bits}"  # type: ignore[misc]

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block} if self.block else {"name": self.name}

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        out: dict[str, np.ndarray] = {}
        for name, arr in delta.items():
            codes, scales = quantize(arr, self.bits, self.block, rng)
            out["q/" + name] = pack_signed(codes, self.bits)
            out["s/" + name] = scales
        return tensors.pack(out, shapes_metadata(delta))

    def _parse(self, body: bytes, spec: TensorSpec) -> list[tuple[str, np.ndarray, np.ndarray]]:
        arrays, metadata = tensors.unpack_with_metadata(body)
        expected = {"q/" + n for n in spec.names} | {"s/" + n for n in spec.names}
        if set(arrays) != expected:
            missing = sorted(expected - set(arrays))[:3]
            extra = sorted(set(arrays) - expected)[:3]
            raise CodecError("shape", f"{self.name} update does not match the model: missing {missing}, "
                                      f"unexpected {extra}")
        check_shapes(metadata, spec, self.name)
        parsed = []
        for name, shape in spec.entries:
            packed, scales = arrays["q/" + name], arrays["s/" + name]
            count = int(np.prod(shape, dtype=np.int64))
            nblocks = (-(-count // self.block) if self.block else 1) if count else 0
            if packed.dtype not in (np.uint8, np.int8) or scales.dtype != np.float32 or scales.shape != (nblocks,):
                raise CodecError("dtype", f"{self.name} update tensor {name!r} has the wrong dtype or scale count")
            if not np.isfinite(scales).all() or (scales < 0).any():
                raise CodecError("nonfinite", f"update tensor {name!r} has a bad scale")
            codes = unpack_signed(packed.view(np.uint8).reshape(-1), self.bits, count)
            parsed.append((name, codes, scales))
        return parsed

    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None:
        for name, codes, scales in self._parse(body, spec):
            dequantize_into(acc[name], codes, scales, self.block, weight)
