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

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedge.errors import FedgeError

ModelArrays = dict[str, np.ndarray]


class TensorError(FedgeError):
    """Tensors that are malformed or do not fit the model (``reason``: a counter tag)."""


def pack(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise named arrays (any safetensors dtype) to bytes, with optional
    string metadata in the header."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=dict(metadata or {}) or None)


_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 << 20


def unpack(data: bytes | memoryview) -> ModelArrays:
    """Parse a safetensors buffer (see ``unpack_with_metadata``)."""
    return unpack_with_metadata(data)[0]


def unpack_with_metadata(data: bytes | memoryview) -> tuple[ModelArrays, dict[str, str]]:
    """Parse a safetensors buffer; raise ``TensorError`` on anything else.

    The arrays are read-only views into ``data`` (no copy: a device holding
    a model, or an aggregator folding updates at wire speed, keeps one copy).
    Every offset, length and shape is checked against the buffer first, as
    the format requires: the tensors tile the data region exactly, without
    gaps or overlaps. The checks are a function of the header's bytes and the
    data's length: a header seen before with the same length (every update
    of a model has the same) is not parsed again."""
    n = len(data)
    if n < 8:
        raise TensorError("malformed", "tensor payload is shorter than its 8-byte length prefix")
    hlen = int.from_bytes(bytes(data[:8]), "little")
    if hlen > min(n - 8, _MAX_HEADER):
        raise TensorError("malformed", f"tensor header claims {hlen} bytes; the payload has {n - 8}")
    header = bytes(data[8 : 8 + hlen])
    layout, metadata = (_layout_cached if hlen <= _CACHED_HEADER else _layout)(header, n - 8 - hlen)
    base = 8 + hlen
    out: ModelArrays = {}
    for name, dtype, shape, count, begin in layout:
        try:
            out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        except (ValueError, OverflowError):  # a shape NumPy cannot make (too many or too large dimensions)
            raise TensorError("malformed", f"tensor {name!r} does not fit its {dtype} {shape} description") from None
    return out, dict(metadata)


# A tensor of a parsed header: name, dtype, shape, entries, offset in the data region.
_Span = tuple[str, np.dtype, tuple[int, ...], int, int]
# Headers up to this long are kept once parsed (a model's is about 1 KB); longer, parsed every time.
_CACHED_HEADER = 1 << 16


def _layout(header: bytes, size: int) -> tuple[tuple[_Span, ...], dict[str, str]]:
    """The tensors a safetensors header describes (in its order) and its
    metadata, checked against a data region of ``size`` bytes."""
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TensorError("malformed", f"tensor header is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise TensorError("malformed", "tensor header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorError("malformed", "tensor metadata must map names to strings")
    spans: list[tuple[int, int]] = []
    layout: list[_Span] = []
    for name, info in parsed.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            raise TensorError("malformed", f"tensor {name!r} has a bad description: {info!r}") from None
        count = math.prod(shape)
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise TensorError("malformed", f"tensor {name!r} does not fit its {dtype} {shape} description")
        spans.append((begin, end))
        layout.append((name, dtype, shape, count, begin))
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise TensorError("malformed", "tensor data has gaps or overlaps")
        cursor = end
    if cursor != size:
        raise TensorError("malformed", "tensor data is not fully covered by its header")
    return tuple(layout), metadata


_layout_cached = functools.lru_cache(maxsize=32)(_layout)


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

    @functools.cached_property
    def counts(self) -> tuple[int, ...]:
        """Entries of each tensor, in order."""
        return tuple(math.prod(s) for _, s in self.entries)

    @functools.cached_property
    def num_params(self) -> int:
        return sum(self.counts)

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


def state_digest(arrays: Mapping[str, np.ndarray], spec: TensorSpec | None = None) -> str:
    """The content digest of a model: sha256 of its canonical safetensors form
    (float32, in spec order). A model rebuilt from a key and a delta on a
    device has the same digest as on the aggregator, or it is not the same
    model."""
    names = spec.names if spec is not None else list(arrays)
    return hashlib.sha256(pack({n: np.asarray(arrays[n], dtype=np.float32) for n in names})).hexdigest()


def zeros_like_spec(spec: TensorSpec, dtype: type = np.float32) -> ModelArrays:
    return {name: np.zeros(shape, dtype=dtype) for name, shape in spec.entries}


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())


def dot(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """The dot product over every tensor of ``a`` with the same-named one of
    ``b``: float32 (fast, and precise enough to compare and bound norms),
    again in float64 for a tensor whose float32 products overflow (a large
    but finite delta)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for name, x in a.items():
            fx, fy = x.reshape(-1), b[name].reshape(-1)
            part = float(np.dot(fx, fy))
            if not math.isfinite(part):
                part = float(np.dot(fx.astype(np.float64), fy.astype(np.float64)))
            total += part
    return total


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over every tensor (see ``dot``)."""
    return math.sqrt(dot(arrays, arrays))
