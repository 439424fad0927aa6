"""Stochastically rounded 8-bit deltas with one scale per tensor.

QSGD-style (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding"): with s = max|x| / 127 and u ~ U[0, 1),
q = floor(x / s + u) is an integer in [-127, 127] whose expectation is x / s,
so q * s is an unbiased estimate of x with |x - q * s| < s. Four times fewer
bytes than float32 for one byte per parameter plus four per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge import tensors
from fedge.codecs.base import CodecError, UpdateCodec
from fedge.tensors import ModelArrays, TensorSpec

_Q = 127


def quantize_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.float32]:
    x = np.asarray(x, dtype=np.float32)
    absmax = float(np.max(np.abs(x))) if x.size else 0.0
    if absmax == 0.0 or not np.isfinite(absmax):
        if not np.isfinite(absmax):
            raise ValueError("cannot quantize a tensor holding NaN or Inf")
        return np.zeros(x.shape, dtype=np.int8), np.float32(0.0)
    scale = np.float32(absmax / _Q)
    v = x / scale
    v += rng.random(x.shape, dtype=np.float32)
    np.floor(v, out=v)
    np.clip(v, -_Q, _Q, out=v)
    return v.astype(np.int8), scale


class Int8Codec(UpdateCodec):
    name = "int8"

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        out: dict[str, np.ndarray] = {}
        for name, arr in delta.items():
            q, scale = quantize_int8(arr, rng)
            out["q/" + name] = q
            out["s/" + name] = np.asarray(scale, dtype=np.float32)
        return tensors.pack(out)

    def _parse(self, body: bytes, spec: TensorSpec) -> list[tuple[str, np.ndarray, float]]:
        arrays = tensors.unpack(body)
        expected = {"q/" + n for n in spec.names} | {"s/" + n for n in spec.names}
        if set(arrays) != expected:
            missing = sorted(expected - set(arrays))[:3]
            extra = sorted(set(arrays) - expected)[:3]
            raise CodecError("shape", f"int8 update does not match the model: missing {missing}, unexpected {extra}")
        parsed = []
        for name, shape in spec.entries:
            q, s = arrays["q/" + name], arrays["s/" + name]
            if q.dtype != np.int8 or s.dtype != np.float32 or s.size != 1:
                raise CodecError("dtype", f"int8 update tensor {name!r} has the wrong dtype or scale")
            if tuple(q.shape) != shape:
                raise CodecError("shape", f"update tensor {name!r} has shape {tuple(q.shape)}, the model has {shape}")
            scale = float(s.reshape(()))
            if not np.isfinite(scale) or scale < 0:
                raise CodecError("nonfinite", f"update tensor {name!r} has scale {scale}")
            parsed.append((name, q, scale))
        return parsed

    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        return {name: q.astype(np.float32) * np.float32(scale) for name, q, scale in self._parse(body, spec)}

    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None:
        for name, q, scale in self._parse(body, spec):
            if scale != 0.0:
                axpy_blocked(acc[name], q, weight * scale)


_BLOCK = 1 << 18


def axpy_blocked(acc: np.ndarray, q: np.ndarray, factor: float) -> None:
    """``acc += factor * q`` in cache-sized blocks: the float temporary stays
    in cache instead of streaming a whole tensor through memory. Blocks are
    large enough (1 MiB of float32) that the few GIL releases per tensor do
    not stall behind the network thread."""
    a, x = acc.reshape(-1), q.reshape(-1)
    f = np.asarray(factor, dtype=acc.dtype)
    tmp = np.empty(min(_BLOCK, x.size), dtype=acc.dtype)
    for start in range(0, x.size, _BLOCK):
        stop = min(start + _BLOCK, x.size)
        t = tmp[: stop - start]
        np.multiply(x[start:stop], f, out=t, dtype=acc.dtype)
        np.add(a[start:stop], t, out=a[start:stop])
