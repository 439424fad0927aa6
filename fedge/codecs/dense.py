"""Dense deltas: ``none`` (float32, the reference every other codec is
measured against) and ``fp16`` (half precision, round to nearest: half the
bytes, relative error below 2^-11 for values within float16's range)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge import tensors
from fedge.codecs.base import CodecError, UpdateCodec, require_finite
from fedge.tensors import ModelArrays, TensorSpec

FP16_MAX = float(np.finfo(np.float16).max)


class _DenseCodec(UpdateCodec):
    dtype: np.dtype

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        return tensors.pack({k: np.asarray(v, dtype=self.dtype) for k, v in delta.items()})

    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        arrays = tensors.unpack(body)
        spec.check(arrays)
        for name, arr in arrays.items():
            if arr.dtype != self.dtype:
                raise CodecError("dtype", f"tensor {name!r} is {arr.dtype}, codec {self.name!r} sends {self.dtype}")
        require_finite(arrays, "update tensor")
        return {name: np.asarray(arrays[name], dtype=np.float32) for name in spec.names}


class Float32Codec(_DenseCodec):
    name = "none"
    dtype = np.dtype(np.float32)


class Float16Codec(_DenseCodec):
    name = "fp16"
    dtype = np.dtype(np.float16)
    unbiased = False

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        for name, v in delta.items():
            if np.abs(np.asarray(v)).max(initial=0.0) > FP16_MAX:
                raise ValueError(f"tensor {name!r} exceeds float16's range; use int8 or none")
        return super().encode(delta, rng)
