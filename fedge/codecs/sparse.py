"""Top-k sparsification: ``topk``.

Each tensor keeps its k = max(1, ceil(fraction * size)) largest-magnitude
entries; the rest are dropped. That is biased, so devices pair it with error
feedback (the agent keeps what was dropped and adds it to its next delta,
Stich et al. 2018, "Sparsified SGD with Memory"; Sattler et al. 2019,
"Robust and Communication-Efficient Federated Learning from Non-IID Data").

Indices travel as LEB128 varint gaps between sorted positions, or as a bitmap
when that is smaller; values as int8 with one stochastic-rounding scale per
tensor (default), float16 or float32. The aggregator folds a payload with a
scatter-add over the kept positions only: time linear in k, no dense copy.

Parameters: ``{"name": "topk", "fraction": 0.01, "values": "int8"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge import tensors
from fedge.codecs.base import CodecError, FoldingCodec, check_shapes, shapes_metadata
from fedge.codecs.packing import indices_decode, indices_encode
from fedge.codecs.quantized import quantize
from fedge.tensors import TensorSpec

VALUE_TYPES = ("int8", "fp16", "float32")


class TopKCodec(FoldingCodec):
    name = "topk"
    unbiased = False

    def __init__(self, fraction: float = 0.01, values: str = "int8") -> None:
        if not 0 < fraction <= 1:
            raise CodecError("codec", f"topk fraction must be in (0, 1], not {fraction}")
        if values not in VALUE_TYPES:
            raise CodecError("codec", f"topk values must be one of {VALUE_TYPES}, not {values!r}")
        self.fraction = float(fraction)
        self.values = values

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "fraction": self.fraction, "values": self.values}

    def keep(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size))) if size else 0

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes:
        out: dict[str, np.ndarray] = {}
        for name, arr in delta.items():
            flat = np.asarray(arr, dtype=np.float32).reshape(-1)
            k = self.keep(flat.size)
            if not np.isfinite(flat).all():
                raise ValueError("cannot sparsify a tensor holding NaN or Inf")
            idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]) if k else np.zeros(0, int)
            kept = flat[idx]
            data, mode = indices_encode(idx, flat.size)
            out["i/" + name] = data
            out["m/" + name] = np.array([mode], np.uint8)
            if self.values == "int8":
                codes, scale = quantize(kept, 8, 0, rng)
                out["v/" + name] = codes
                out["s/" + name] = scale
            else:
                out["v/" + name] = kept.astype(np.float16 if self.values == "fp16" else np.float32)
        return tensors.pack(out, shapes_metadata(delta))

    def _parse(self, body: bytes, spec: TensorSpec) -> list[tuple[str, np.ndarray, np.ndarray]]:
        arrays, metadata = tensors.unpack_with_metadata(body)
        prefixes = ("i/", "m/", "v/", "s/") if self.values == "int8" else ("i/", "m/", "v/")
        expected = {p + n for n in spec.names for p in prefixes}
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays))[:3], sorted(set(arrays) - expected)[:3]
            raise CodecError("shape", f"topk update does not match the model: missing {missing}, unexpected {extra}")
        check_shapes(metadata, spec, self.name)
        want = {"int8": np.int8, "fp16": np.float16, "float32": np.float32}[self.values]
        parsed = []
        for name, shape in spec.entries:
            size = int(np.prod(shape, dtype=np.int64))
            k = self.keep(size)
            data, mode, vals = arrays["i/" + name], arrays["m/" + name], arrays["v/" + name]
            if (data.dtype != np.uint8 or mode.dtype != np.uint8 or mode.shape != (1,) or vals.dtype != want
                    or vals.shape != (k,)):
                raise CodecError("dtype", f"topk update tensor {name!r} has the wrong layout")
            idx = indices_decode(data.reshape(-1), int(mode[0]), k, size)
            if self.values == "int8":
                scale = arrays["s/" + name]
                if scale.dtype != np.float32 or scale.shape not in ((1,), (0,)) or not np.isfinite(scale).all():
                    raise CodecError("nonfinite", f"topk update tensor {name!r} has a bad scale")
                values = vals.astype(np.float32) * (scale[0] if scale.size else np.float32(0))
            else:
                values = vals.astype(np.float32)
                if not np.isfinite(values).all():
                    raise CodecError("nonfinite", f"update tensor {name!r} contains NaN or Inf")
            parsed.append((name, idx, values))
        return parsed

    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None:
        for name, idx, values in self._parse(body, spec):
            flat = acc[name].reshape(-1)
            flat[idx] += values * np.asarray(weight, flat.dtype)  # indices are unique: a plain scatter-add
