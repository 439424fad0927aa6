"""Uncompressed deltas: ``none`` (float32, the reference every other codec is
measured against)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge import tensors
from fedge.codecs.base import CodecError, UpdateCodec, require_finite
from fedge.tensors import ModelArrays, TensorSpec


class Float32Codec(UpdateCodec):
    name = "none"

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        return tensors.pack({k: np.asarray(v, dtype=np.float32) for k, v in delta.items()})

    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        arrays = tensors.unpack(body)
        spec.check(arrays)
        for name, arr in arrays.items():
            if arr.dtype != np.float32:
                raise CodecError("dtype", f"tensor {name!r} is {arr.dtype}, codec 'none' sends float32")
        require_finite(arrays, "update tensor")
        return {name: arrays[name] for name in spec.names}
