"""An optional lossless stage on top of any codec: ``{"lossless": "zlib"}``
(or ``"zstd"`` where the ``zstandard`` package is installed).

It pays off where the inner codec leaves redundancy: zeros of ternary int2
codes, small varint gaps, the slowly varying exponents of fp16. Decompression
is bounded by what the model can legitimately need, so a compressed bomb is
refused before it can fill memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge.codecs.base import CodecError, UpdateCodec
from fedge.tensors import ModelArrays, TensorSpec

try:  # optional: pip install zstandard
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the device
    _zstd = None

METHODS = ("zlib", "zstd") if _zstd is not None else ("zlib",)


def max_inner_bytes(spec: TensorSpec) -> int:
    """The most any codec may need for this model: float32 values plus
    index/scale overhead and headers."""
    return 12 * spec.num_params + 256 * len(spec.entries) + (1 << 16)


class LosslessCodec(UpdateCodec):
    def __init__(self, inner: UpdateCodec, method: str) -> None:
        if method not in METHODS:
            raise CodecError("codec", f"lossless stage {method!r} is not available here; use one of {METHODS}")
        self.inner = inner
        self.method = method
        self.name = inner.name  # type: ignore[misc]
        self.unbiased = inner.unbiased  # type: ignore[misc]

    def params(self) -> dict[str, Any]:
        return {**self.inner.params(), "lossless": self.method}

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        raw = self.inner.encode(delta, rng)
        if self.method == "zstd":
            return _zstd.ZstdCompressor(level=6).compress(raw)
        return zlib.compress(raw, 6)

    def _inflate(self, body: bytes, spec: TensorSpec) -> bytes:
        limit = max_inner_bytes(spec)
        try:
            if self.method == "zstd":
                with _zstd.ZstdDecompressor().stream_reader(body) as reader:
                    raw = reader.read(limit + 1)
            else:
                d = zlib.decompressobj()
                raw = d.decompress(body, limit + 1)
                if not d.eof:
                    raise CodecError("malformed", "compressed update is truncated or too large")
        except CodecError:
            raise
        except Exception as exc:  # zlib.error, zstd errors: all mean a bad body
            raise CodecError("malformed", f"compressed update cannot be inflated: {exc}") from None
        if len(raw) > limit:
            raise CodecError("oversized", f"compressed update inflates beyond {limit} bytes")
        return raw

    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        return self.inner.decode(self._inflate(body, spec), spec)

    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None:
        self.inner.fold(self._inflate(body, spec), spec, acc, weight)

    def decode_into(self, body: bytes, spec: TensorSpec, out: Mapping[str, np.ndarray]) -> None:
        self.inner.decode_into(self._inflate(body, spec), spec, out)
