"""Running an ONNX model with ONNX Runtime, for devices without PyTorch.

Shared by the export toolchain (parity checks, benchmarks, ``fedge
predict``) and the inference-only edge agent, which is why it lives in
``fedge``: ``OnnxPredictor``, the session settings every measurement uses,
and the probe of the host's int8 arithmetic. It must never import PyTorch,
directly or through another module: an inference-only device does not have
it installed.

Int8 arithmetic differs between CPUs: ONNX Runtime's u8 x s8 kernels on
x86 without VNNI saturate pair sums at 16 bits, where VNNI, AMX and ARM
compute exact products. What that means for a model's reported figures is
``export.target``'s business; here a session runs the file as given, the way
a device would.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedge.errors import OneReasonError, one_line
from fedge.progress import Progress


class OnnxModelError(OneReasonError):
    """An ONNX file that cannot be found, loaded or fed: one line naming the fix."""

    default_reason = "onnx_model"


ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_NODE_STATUS = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message:\s*")


def default_threads() -> int:
    """Intra-op threads: one per available core (2 on a CI runner, 4 on a Pi)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> Any:
    """ORT session options: ``ORT_ENABLE_ALL``, which is what fuses
    QuantizeLinear/DequantizeLinear pairs into integer kernels, so a quantized
    model is measured the way a device runs it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or default_threads())
    opts.inter_op_num_threads = 1
    # 4 = fatal only: a failed run is reported through the exception we turn
    # into one line, not also as a coloured log line on stderr.
    opts.log_severity_level = 4
    return opts


def open_session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise OnnxModelError(f"ONNX model {str(p)!r} not found; check the path")
    try:
        return ort.InferenceSession(str(p), sess_options=session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxModelError(f"ONNX Runtime cannot load {str(p)!r}: {runtime_message(exc)}") from None


def runtime_message(exc: BaseException) -> str:
    """An ONNX Runtime exception's text without its status prefix, on one line."""
    text = _ORT_PREFIX.sub("", str(exc).strip()) or type(exc).__name__
    text = _NODE_STATUS.sub(lambda m: f"{m.group(1)} node{' ' + repr(m.group(2)) if m.group(2) else ''}: ", text)
    return one_line(text)


def _dims(shape: tuple[Any, ...]) -> str:
    return "x".join(str(d) if isinstance(d, int) else (d or "?") for d in shape)


class OnnxPredictor:
    """Inference on one ONNX file with ONNX Runtime (CPU).

    ``predict`` takes a dict of named arrays, or a single array for a
    one-input model, and returns the first output; inputs are checked against
    the shapes and dtypes the model declares, cast to its dtypes, and fed in
    chunks of ``batch_size`` rows. Every failure is an ``OnnxModelError``.
    """

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 256) -> None:
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        self.batch_size = max(1, int(batch_size))
        self.inputs = [(i.name, ORT_TYPES.get(i.type, np.float32), tuple(i.shape)) for i in self.session.get_inputs()]
        self.input_names = [name for name, _, _ in self.inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _feeds(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                raise OnnxModelError(f"model {self.path.name} has inputs {self.input_names}; pass a dict of arrays")
            inputs = {self.input_names[0]: inputs}
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise OnnxModelError(f"model {self.path.name} needs inputs {self.input_names}; missing {missing}")
        feeds = {}
        for name, dtype, shape in self.inputs:
            arr = np.asarray(inputs[name])
            check_input(name, arr, np.dtype(dtype), shape)
            feeds[name] = np.ascontiguousarray(arr, dtype=dtype)
        sizes = {len(a) for a in feeds.values()}
        if len(sizes) != 1:
            raise OnnxModelError(f"inputs have different batch sizes {sorted(sizes)}")
        return feeds

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray, progress: Progress | None = None
            ) -> list[np.ndarray]:
        """All outputs, computed chunk by chunk and concatenated (``progress``
        advanced by each chunk's rows)."""
        feeds = self._feeds(inputs)
        n = len(next(iter(feeds.values())))
        chunks: list[list[np.ndarray]] = []
        for start in range(0, max(n, 1), self.batch_size):
            part = {k: v[start : start + self.batch_size] for k, v in feeds.items()}
            try:
                chunks.append(self.session.run(None, part))
            except Exception as exc:
                raise OnnxModelError(run_failure(self.path.name, exc, start)) from None
            if progress is not None:
                progress.advance(min(self.batch_size, n - start))
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.output_names))]

    def predict(self, inputs: Mapping[str, np.ndarray] | np.ndarray, progress: Progress | None = None) -> np.ndarray:
        return self.run(inputs, progress)[0]


def check_input(name: str, arr: np.ndarray, dtype: np.dtype[Any], shape: tuple[Any, ...]) -> None:
    """Refuse an array that the model would misread: wrong rank, a fixed
    dimension of the wrong size, fractional values for an integer input
    (which a cast would silently truncate), or NaN and infinities (which a
    model answers with something that looks like an answer: class 0)."""
    expected = _dims(shape)
    if arr.ndim != len(shape):
        raise OnnxModelError(f"input {name!r} has shape {_dims(arr.shape)}; the model expects rank {len(shape)} "
                             f"({expected}, first dimension = batch)")
    for axis, (got, want) in enumerate(zip(arr.shape, shape, strict=True)):
        if isinstance(want, int) and want > 0 and got != want:
            raise OnnxModelError(f"input {name!r} has shape {_dims(arr.shape)}; dimension {axis} is {got} but the "
                                 f"model expects {want} (shape {expected}, first dimension = batch)")
    if arr.dtype.kind not in "biuf":
        raise OnnxModelError(f"input {name!r} holds {arr.dtype} values; the model takes {dtype} numbers")
    if dtype.kind in "iub" and arr.dtype.kind == "f":
        raise OnnxModelError(f"input {name!r} holds {arr.dtype} values but the model takes {dtype} (ids, classes or "
                             f"flags): store integers, e.g. x.astype(np.{dtype}), rather than letting a cast "
                             "truncate fractions")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0]) if arr.ndim else 0
            raise OnnxModelError(f"input {name!r} holds {int(bad.sum())} NaN or infinite value(s), the first in "
                                 f"row {row}: a model's answer to them means nothing; fill or drop those rows")


def run_failure(model: str, exc: BaseException, first_row: int = 0) -> str:
    """One line for a failed ``session.run``, with the likely cause where it is known."""
    text = runtime_message(exc)
    hint = ""
    if "out of data bounds" in text or "indices element out of" in text:
        hint = ("; an integer input (a token or category id) is outside the table the model indexes: "
                "ids must be below the vocabulary size")
    where = f" (rows from {first_row})" if first_row else ""
    return f"ONNX Runtime failed to run {model}{where}: {text}{hint}"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
