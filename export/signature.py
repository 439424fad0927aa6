"""The input signature of an exported model: names, shapes and dtypes.

Owns parsing the CLI form ``NAME:SHAPE[:DTYPE]`` (``x:1x64:float32``,
``tokens:1x32:int64``) into ``InputSpec`` and making example arrays for
them. The first dimension is always the batch and is exported as dynamic;
the number written there only sizes the example. NumPy only: no PyTorch, so
the runtime helper can use it too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.errors import ExportError

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
    """One model input. ``shape[0]`` is the (dynamic) batch dimension."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ExportError(f"input name {self.name!r} is not a valid identifier; use letters, digits and _")
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise ExportError(f"input {self.name!r}: shape {self.shape} must have positive dimensions, batch first")
        if self.dtype not in DTYPES:
            raise ExportError(f"input {self.name!r}: dtype {self.dtype!r} is not supported; use one of "
                              f"{', '.join(DTYPES)}")

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return DTYPES[self.dtype]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example (without the batch dimension)."""
        return self.shape[1:]

    def example(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """A random batch. Integer inputs stay in [0, 2) so that embedding
        lookups and class indices are valid for any model."""
        shape = (batch, *self.sample_shape)
        kind = self.np_dtype.kind
        if kind == "f":
            return rng.standard_normal(shape).astype(self.np_dtype)
        if kind == "b":
            return rng.integers(0, 2, size=shape).astype(np.bool_)
        return rng.integers(0, 2, size=shape).astype(self.np_dtype)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [BATCH_DIM, *self.sample_shape], "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(str(d) for d in self.shape)}:{self.dtype}"


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``NAME:SHAPE[:DTYPE]``; SHAPE is ``x``-separated, batch first."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ExportError(f"--input {text!r} must be NAME:SHAPE[:DTYPE], e.g. x:1x64:float32 "
                          "(the first dimension is the batch and is exported as dynamic)")
    name, shape_text = parts[0], parts[1]
    dtype = parts[2] if len(parts) == 3 else "float32"
    dims = shape_text.lower().split("x")
    shape: list[int] = []
    for i, d in enumerate(dims):
        if i == 0 and (d in ("b", "n", "batch", "?")):
            shape.append(1)
            continue
        if not d.isdigit() or int(d) < 1:
            raise ExportError(f"--input {text!r}: dimension {d!r} is not a positive integer; "
                              "write the shape like 1x3x32x32")
        shape.append(int(d))
    return InputSpec(name=name, shape=tuple(shape), dtype=dtype)


def parse_input_specs(texts: Sequence[str]) -> list[InputSpec]:
    specs = [parse_input_spec(t) for t in texts]
    if not specs:
        raise ExportError("give the model's input signature with --input NAME:SHAPE[:DTYPE], e.g. x:1x64:float32")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExportError(f"input names must be unique; {', '.join(dup)} appears more than once")
    return specs


def examples(specs: Sequence[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: s.example(batch, rng) for s in specs}
