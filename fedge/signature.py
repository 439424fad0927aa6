"""The input signature of an exported model: names, shapes and dtypes.

Owns parsing the CLI form ``NAME:SHAPE[:DTYPE[:LOW..HIGH]]`` into
``InputSpec`` and making example arrays for them:

- ``x:1x64:float32``: the first dimension is always the batch and is
  exported as dynamic (named ``batch``); the number written there only sizes
  the example.
- ``tokens:1xseq=32:int64``: ``NAME=N`` makes another dimension dynamic too,
  named ``NAME``, with an example of size ``N`` (2 or more: ``torch.export``
  fixes dimensions it sees at size 0 or 1). Inputs that name the same
  dimension share it.
- ``tokens:1x32:int64:0..9999``: the values an integer input may take, both
  ends included (a 10,000-token vocabulary). Without it, the exporter finds
  the range of an input that indexes an embedding table in the graph, and
  otherwise checks on 0 and 1 only.

It lives in the contract because two roles read it: the aggregator checks
its ``onnx.inputs`` with it, the export toolchain exports with it. NumPy
only: no PyTorch, so the runtime helper can use it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.errors import OneReasonError


class SignatureError(OneReasonError):
    """An input signature that cannot be parsed or built: one line naming the fix."""

    default_reason = "signature"


DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
BATCH_DIM = "batch"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape[0]`` is the (dynamic) batch dimension;
    ``dynamic[i]`` names another dynamic dimension (``None`` where fixed)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[str | None, ...] = ()
    low: int | None = None
    high: int | None = None  # both included

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise SignatureError(f"input name {self.name!r} is not a valid identifier; use letters, digits and _")
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise SignatureError(f"input {self.name!r}: shape {self.shape} must have positive dimensions, batch first")
        if self.dtype not in DTYPES:
            raise SignatureError(f"input {self.name!r}: dtype {self.dtype!r} is not supported; use one of "
                              f"{', '.join(DTYPES)}")
        if self.dynamic and len(self.dynamic) != len(self.shape):
            raise SignatureError(f"input {self.name!r}: name each dimension or none")
        if (self.low is None) != (self.high is None):
            raise SignatureError(f"input {self.name!r}: give both ends of the range, LOW..HIGH")
        if self.low is not None and self.high is not None:
            if self.np_dtype.kind not in "iu":
                raise SignatureError(f"input {self.name!r}: a value range LOW..HIGH applies to integer inputs only")
            if self.low > self.high:
                raise SignatureError(f"input {self.name!r}: range {self.low}..{self.high} is empty; write LOW..HIGH")

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return DTYPES[self.dtype]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example (without the batch dimension)."""
        return self.shape[1:]

    @property
    def dim_names(self) -> tuple[str | None, ...]:
        """``batch`` first, then each dynamic dimension's name or ``None``."""
        rest = self.dynamic[1:] if self.dynamic else (None,) * (len(self.shape) - 1)
        return (BATCH_DIM, *rest)

    @property
    def value_range(self) -> tuple[int, int] | None:
        return None if self.low is None or self.high is None else (self.low, self.high)

    def example(self, batch: int, rng: np.random.Generator, sizes: Mapping[str, int] | None = None,
                value_range: tuple[int, int] | None = None) -> np.ndarray:
        """A random batch. Named dynamic dimensions take their size from
        ``sizes`` (else the example's); integer inputs are drawn from their
        range (this spec's, else ``value_range``, else [0, 1], which is valid
        for any embedding or class index)."""
        dims = tuple(sizes.get(n, d) if sizes and n else d
                     for n, d in zip(self.dim_names[1:], self.sample_shape, strict=True))
        shape = (batch, *dims)
        kind = self.np_dtype.kind
        if kind == "f":
            return rng.standard_normal(shape).astype(self.np_dtype)
        if kind == "b":
            return rng.integers(0, 2, size=shape).astype(np.bool_)
        low, high = self.value_range or value_range or (0, 1)
        return rng.integers(low, high, size=shape, endpoint=True).astype(self.np_dtype)

    def to_json(self) -> dict[str, Any]:
        shape: list[int | str] = [n or d for n, d in zip(self.dim_names, self.shape, strict=True)]
        out: dict[str, Any] = {"name": self.name, "shape": shape, "dtype": self.dtype}
        if self.value_range:
            out["range"] = list(self.value_range)
        return out

    def __str__(self) -> str:
        dims = [str(d) if i == 0 or not n else f"{n}={d}"
                for i, (n, d) in enumerate(zip(self.dim_names, self.shape, strict=True))]
        tail = f":{self.low}..{self.high}" if self.value_range else ""
        return f"{self.name}:{'x'.join(dims)}:{self.dtype}{tail}"


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``NAME:SHAPE[:DTYPE[:LOW..HIGH]]``; SHAPE is ``x``-separated,
    batch first, with ``NAME=N`` for another dynamic dimension."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3, 4) or not parts[0] or not parts[1]:
        raise SignatureError(f"--input {text!r} must be NAME:SHAPE[:DTYPE[:LOW..HIGH]], e.g. x:1x64:float32 or "
                          "tokens:1xseq=32:int64:0..9999 (the first dimension is the batch and is exported as "
                          "dynamic)")
    name, shape_text = parts[0], parts[1]
    dtype = parts[2] if len(parts) >= 3 and parts[2] else "float32"
    low = high = None
    if len(parts) == 4:
        m = _RANGE.match(parts[3])
        if not m:
            raise SignatureError(f"--input {text!r}: range {parts[3]!r} must be LOW..HIGH, both ends included, "
                              "e.g. 0..9999")
        low, high = int(m.group(1)), int(m.group(2))
    shape: list[int] = []
    names: list[str | None] = []
    for i, d in enumerate(shape_text.lower().split("x") if shape_text else []):
        if i == 0 and d in ("b", "n", "batch", "?"):
            shape.append(1)
            names.append(BATCH_DIM)
            continue
        dim_name, eq, size = d.rpartition("=")
        if eq:
            if i == 0 or not _NAME.match(dim_name) or dim_name == BATCH_DIM:
                raise SignatureError(f"--input {text!r}: {d!r} must be NAME=SIZE with a name other than 'batch' "
                                  "(the first dimension is always the batch)")
            if not size.isdigit() or int(size) < 2:
                raise SignatureError(f"--input {text!r}: dynamic dimension {dim_name!r} needs an example size of 2 or "
                                  f"more (torch.export fixes dimensions it sees at 0 or 1), e.g. {dim_name}=32")
        elif not size.isdigit() or int(size) < 1:
            raise SignatureError(f"--input {text!r}: dimension {d!r} is not a positive integer; "
                              "write the shape like 1x3x32x32, or NAME=SIZE for a dynamic dimension")
        shape.append(int(size))
        names.append(BATCH_DIM if i == 0 else (dim_name or None))
    dynamic = tuple(names) if any(n for n in names[1:]) else ()
    return InputSpec(name=name, shape=tuple(shape), dtype=dtype, dynamic=dynamic, low=low, high=high)


def parse_input_specs(texts: Sequence[str]) -> list[InputSpec]:
    specs = [parse_input_spec(t) for t in texts]
    if not specs:
        raise SignatureError("give the model's input signature with --input NAME:SHAPE[:DTYPE], e.g. x:1x64:float32")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SignatureError(f"input names must be unique; {', '.join(dup)} appears more than once")
    return specs


def dynamic_sizes(specs: Sequence[InputSpec]) -> dict[str, int]:
    """Each named dynamic dimension (other than the batch) and its example size."""
    sizes: dict[str, int] = {}
    for spec in specs:
        for name, size in zip(spec.dim_names[1:], spec.sample_shape, strict=True):
            if name:
                sizes.setdefault(name, size)
    return sizes


def examples(specs: Sequence[InputSpec], batch: int, seed: int = 0, sizes: Mapping[str, int] | None = None,
             ranges: Mapping[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = {**dynamic_sizes(specs), **dict(sizes or {})}
    return {s.name: s.example(batch, rng, shared, (ranges or {}).get(s.name)) for s in specs}
