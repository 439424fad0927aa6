"""Named tensors as bytes, and the shape contract of a model.

A model state travels as an ordered mapping ``name -> float32 array``
(``ModelArrays``) serialised with safetensors: a JSON header plus raw
little-endian buffers, parsed by a bounds-checked reader, never pickle.

``TensorSpec`` is the shape contract both roles check an update against: the
aggregator refuses an update whose names or shapes differ from the global
model's, before a single number is folded.

NumPy only; the PyTorch side of model state is ``fedge.torch_state``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ModelArrays = dict[str, np.ndarray]


class TensorError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def pack(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays (any safetensors dtype) to bytes."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def unpack(data: bytes) -> ModelArrays:
    """Parse bytes written by ``pack``; raise ``TensorError`` on anything else."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(data) < 8:
        raise TensorError("malformed", "tensor payload is shorter than its 8-byte length prefix")
    try:
        return load(bytes(data))
    except SafetensorError as exc:
        raise TensorError("malformed", f"tensor payload is not valid safetensors: {exc}") from None
    except Exception as exc:  # the Rust reader may raise other errors on hostile input
        raise TensorError("malformed", f"tensor payload could not be read: {exc}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Ordered (name, shape) pairs of a model's federated float tensors."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> TensorSpec:
        return cls(tuple((k, tuple(int(d) for d in v.shape)) for k, v in arrays.items()))

    @classmethod
    def from_json(cls, obj: object) -> TensorSpec:
        if not isinstance(obj, list):
            raise TensorError("malformed", "tensor spec must be a list of [name, shape] pairs")
        entries = []
        for item in obj:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], list)
                or not all(isinstance(d, int) and d >= 0 for d in item[1])
            ):
                raise TensorError("malformed", f"bad tensor spec entry {item!r}")
            entries.append((item[0], tuple(item[1])))
        return cls(tuple(entries))

    def to_json(self) -> list[list[object]]:
        return [[name, list(shape)] for name, shape in self.entries]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.entries]

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for _, s in self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return dict(self.entries)[name]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()[:16]

    def check(self, arrays: Mapping[str, np.ndarray], *, what: str = "update") -> None:
        """Raise ``TensorError('shape', ...)`` unless ``arrays`` has exactly
        these names and shapes."""
        expected = dict(self.entries)
        missing = [n for n in expected if n not in arrays]
        extra = [n for n in arrays if n not in expected]
        if missing or extra:
            raise TensorError(
                "shape",
                f"{what} tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}",
            )
        for name, shape in expected.items():
            got = tuple(arrays[name].shape)
            if got != shape:
                raise TensorError("shape", f"{what} tensor {name!r} has shape {got}, the model has {shape}")


def zeros_like_spec(spec: TensorSpec, dtype: type = np.float32) -> ModelArrays:
    return {name: np.zeros(shape, dtype=dtype) for name, shape in spec.entries}


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())
