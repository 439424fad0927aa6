"""What every update codec provides.

A codec turns a model delta (named float32 arrays) into a body of bytes and
back. The aggregator never asks for the dense delta: it asks the codec to
``fold`` a body straight into its running sum, which each codec does in time
linear in the body (dequantize-and-axpy, scatter-add, ...). ``fold`` must
validate the whole body before touching the sum, so a bad update never leaves
half of itself behind.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedge.errors import FedgeError
from fedge.tensors import ModelArrays, TensorSpec, zeros_like_spec

# Shapes metadata up to this long is parsed once and kept (a model's is a few
# hundred bytes); longer, every time.
_CACHED_SHAPES = 1 << 16


class CodecError(FedgeError):
    """A body this codec cannot accept (reason is a short counter tag)."""


class UpdateCodec(ABC):
    name: ClassVar[str]
    # True when E[decode(encode(x))] == x over the codec's own randomness.
    unbiased: ClassVar[bool] = True

    @abstractmethod
    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator) -> bytes: ...

    @abstractmethod
    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        """Dense float32 arrays, validated against ``spec``."""

    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None:
        """``acc[name] += weight * decode(body)[name]`` for every tensor."""
        dense = self.decode(body, spec)
        for name, arr in dense.items():
            acc_arr = acc[name]
            np.add(acc_arr, np.multiply(arr, weight, dtype=acc_arr.dtype), out=acc_arr)

    def decode_into(self, body: bytes, spec: TensorSpec, out: Mapping[str, np.ndarray]) -> None:
        """Overwrite ``out`` (arrays of ``spec``'s shapes) with the delta of
        ``body``, bit for bit as ``fold`` with weight 1 into zeros: what the
        aggregator's scratch model holds. Raises as ``fold`` does; ``out``'s
        contents are then unspecified. Codecs that can write the delta
        straight into ``out`` override it to save the zeroing."""
        for a in out.values():
            a.fill(0.0)
        self.fold(body, spec, out, 1.0)

    def params(self) -> dict[str, Any]:
        """What goes into a round announcement to make this exact codec."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()})"


class FoldingCodec(UpdateCodec):
    """A codec whose natural operation is ``fold``: decoding is folding into
    zeros with weight 1, so the two can never disagree."""

    def decode(self, body: bytes, spec: TensorSpec) -> ModelArrays:
        out = zeros_like_spec(spec)
        self.fold(body, spec, out, 1.0)
        return out

    @abstractmethod
    def fold(self, body: bytes, spec: TensorSpec, acc: Mapping[str, np.ndarray], weight: float) -> None: ...


def shapes_metadata(delta: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The tensors' shapes, for codecs whose payload holds flat codes: the
    receiver checks them, so a transposed tensor is refused, not misread."""
    return {"shapes": json.dumps({k: list(np.shape(v)) for k, v in delta.items()}, separators=(",", ":"))}


@functools.lru_cache(maxsize=32)
def _declared_shapes(text: str) -> dict[str, tuple[Any, ...]]:
    """The shapes metadata, parsed (the same text in every update of a
    model: parsed once). Not to be changed: it is shared."""
    return {k: tuple(v) for k, v in json.loads(text).items()}


def check_shapes(metadata: Mapping[str, str], spec: TensorSpec, codec: str) -> None:
    try:
        text = metadata["shapes"]
        cached = isinstance(text, str) and len(text) <= _CACHED_SHAPES
        got = _declared_shapes(text) if cached else {k: tuple(v) for k, v in json.loads(text).items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise CodecError("malformed", f"{codec} update does not say its tensor shapes") from None
    for name, shape in spec.entries:
        if got.get(name) != shape:
            raise CodecError("shape", f"update tensor {name!r} has shape {got.get(name)}, the model has {shape}")


def require_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            raise CodecError("nonfinite", f"{what} {name!r} contains NaN or Inf")
