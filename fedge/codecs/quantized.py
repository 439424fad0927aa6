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

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge import tensors
from fedge.codecs.base import CodecError, FoldingCodec, check_shapes, shapes_metadata
from fedge.codecs.packing import (
    CODE_TABLES,
    check_codes,
    check_length,
    codes_in_range,
    levels,
    pack_signed,
    unpack_checked,
)
from fedge.tensors import ModelArrays, TensorSpec

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
        self._layouts: dict[TensorSpec, tuple[frozenset[str], tuple[tuple[str, int, int], ...]]] = {}
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

    def _layout(self, spec: TensorSpec) -> tuple[frozenset[str], tuple[tuple[str, int, int], ...]]:
        """The body's tensor names for ``spec``, and each tensor's (name,
        entries, scales); made once per model."""
        layout = self._layouts.get(spec)
        if layout is None:
            names = frozenset(["q/" + n for n in spec.names] + ["s/" + n for n in spec.names])
            tensors_ = []
            for (name, _), count in zip(spec.entries, spec.counts, strict=True):
                nblocks = (-(-count // self.block) if self.block else 1) if count else 0
                tensors_.append((name, count, nblocks))
            if len(self._layouts) >= 8:
                self._layouts.clear()
            layout = self._layouts[spec] = (names, tuple(tensors_))
        return layout

    def _parse(self, body: bytes, spec: TensorSpec) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
        """Every check of ``body``, before any number is used: (name, packed
        codes as flat uint8, scales, entries) per tensor of ``spec``. The
        checks run tensor by tensor (dtypes and scales, length, codes), and
        the first that fails decides; the codes of all tensors are checked
        in one pass, and one by one only to name the first bad one."""
        arrays, metadata = tensors.unpack_with_metadata(body)
        expected, layout = self._layout(spec)
        if arrays.keys() != expected:
            missing = sorted(expected - set(arrays))[:3]
            extra = sorted(set(arrays) - expected)[:3]
            raise CodecError("shape", f"{self.name} update does not match the model: missing {missing}, "
                                      f"unexpected {extra}")
        check_shapes(metadata, spec, self.name)
        parsed: list[tuple[str, np.ndarray, np.ndarray, int]] = []
        for name, count, nblocks in layout:
            packed, scales = arrays["q/" + name], arrays["s/" + name]
            try:
                if (packed.dtype not in (np.uint8, np.int8) or scales.dtype != np.float32
                        or scales.shape != (nblocks,)):
                    raise CodecError("dtype", f"{self.name} update tensor {name!r} has the wrong dtype or scale "
                                              "count")
                if nblocks == 1:
                    scale = float(scales[0])
                    bad = not math.isfinite(scale) or scale < 0
                else:
                    bad = not np.isfinite(scales).all() or bool((scales < 0).any())
                if bad:
                    raise CodecError("nonfinite", f"update tensor {name!r} has a bad scale")
                flat = packed.view(np.uint8).reshape(-1)
                check_length(flat, self.bits, count)
            except CodecError:
                self._check_codes(parsed)  # the tensors before this one were checked whole first
                raise
            parsed.append((name, flat, scales, count))
        if not codes_in_range([(p, count) for _, p, _, count in parsed], self.bits):
            self._check_codes(parsed)
        return parsed

    def _check_codes(self, parsed: list[tuple[str, np.ndarray, np.ndarray, int]]) -> None:
        """Raise for the first tensor with a code outside [-L, L]."""
        for _, packed, _, count in parsed:
            check_codes(packed, self.bits, count)

    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None:
        self._dequantize(self._parse(body, spec), acc, weight, overwrite=False)

    def decode_into(self, body: bytes, spec: TensorSpec, out: Mapping[str, np.ndarray]) -> None:
        """``decode`` into ``out`` (``UpdateCodec.decode_into``): the scaled
        codes are written, not added to zeros."""
        self._dequantize(self._parse(body, spec), out, 1.0, overwrite=True)

    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        out = {name: np.empty(shape, np.float32) for name, shape in spec.entries}
        self.decode_into(body, spec, out)
        return out

    def _dequantize(self, parsed: list[tuple[str, np.ndarray, np.ndarray, int]], acc: Mapping[str, np.ndarray],
                    factor: float, overwrite: bool) -> None:
        """``acc[name] += factor * codes * scales`` of checked tensors
        (``overwrite``: ``acc[name] = 0 + ...``, bit for bit as into zeros).
        A tensor of one scale into float32: one gather per byte from a table
        of every byte's fields times the scale (rounded as
        ``dequantize_into`` rounds it); others: ``dequantize_into``."""
        fast = []
        for name, packed, scales, count in parsed:
            out = acc[name]
            if count == 0:
                continue
            if len(scales) == 1 and out.dtype == np.float32 and out.flags.c_contiguous:
                fast.append((out, packed, factor * float(scales[0]), count))
                continue
            if overwrite:
                out.fill(0.0)
            dequantize_into(out, unpack_checked(packed, self.bits, count), scales, self.block, factor)
        if not fast:
            return
        per = 8 // self.bits
        factors = np.array([f for _, _, f, _ in fast], dtype=np.float32)
        with np.errstate(over="ignore"):  # a table scales codes the body may not have (inf where it has them)
            tables = CODE_TABLES[self.bits][1] * factors[:, None, None]  # (tensors, 256, per)
            if overwrite and not (factors > 0).all():
                tables += np.float32(0.0)  # 0 + (-0.0) is +0.0, as into zeros
        if per == 1:
            tables = tables.reshape(len(fast), 256)
        for table, (out, packed, _, count) in zip(tables, fast, strict=True):
            full, rem = divmod(count, per)
            flat = out.reshape(-1)
            if overwrite:
                table.take(packed[:full], axis=0, out=_rows(flat[: full * per], per), mode="wrap")
                if rem:
                    flat[full * per :] = table[int(packed[full]), :rem]
                continue
            step = _BLOCK // per  # bytes per slice: the float temporary stays in cache
            tmp = np.empty(min(full, step) * per, np.float32)
            for b0 in range(0, full, step):
                b1 = min(b0 + step, full)
                t = tmp[: (b1 - b0) * per]
                table.take(packed[b0:b1], axis=0, out=_rows(t, per), mode="wrap")
                np.add(flat[b0 * per : b1 * per], t, out=flat[b0 * per : b1 * per])
            if rem:
                tail = flat[full * per :]
                np.add(tail, table[int(packed[full]), :rem], out=tail)


def _rows(a: np.ndarray, per: int) -> np.ndarray:
    """A flat float32 slice as the gather's output: one row of ``per`` a byte."""
    return a if per == 1 else a.reshape(-1, per)
