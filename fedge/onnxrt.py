"""Running an ONNX model with ONNX Runtime, for devices without PyTorch.

Shared by the export toolchain (parity checks, benchmarks, ``fedge
predict``) and the inference-only edge agent, which is why it lives in
``fedge``: ``OnnxPredictor`` and the session settings every measurement
uses. It must never import PyTorch, directly or through another module: an
inference-only device does not have it installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class OnnxModelError(ValueError):
    """An ONNX file that cannot be found, loaded or fed: one line naming the fix."""


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
    opts.log_severity_level = 3
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxModelError(f"ONNX Runtime cannot load {str(p)!r}: {first}") from None


class OnnxPredictor:
    """Inference on one ONNX file with ONNX Runtime (CPU).

    ``predict`` takes a dict of named arrays, or a single array for a
    one-input model, and returns the first output; inputs are cast to the
    dtype the model declares and fed in chunks of ``batch_size`` rows.
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
            if arr.ndim != len(shape):
                raise OnnxModelError(f"input {name!r} has shape {arr.shape}; the model expects rank {len(shape)} "
                                  f"({'x'.join(str(d) for d in shape)}, first dimension = batch)")
            feeds[name] = np.ascontiguousarray(arr, dtype=dtype)
        sizes = {len(a) for a in feeds.values()}
        if len(sizes) != 1:
            raise OnnxModelError(f"inputs have different batch sizes {sorted(sizes)}")
        return feeds

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """All outputs, computed chunk by chunk and concatenated."""
        feeds = self._feeds(inputs)
        n = len(next(iter(feeds.values())))
        chunks: list[list[np.ndarray]] = []
        for start in range(0, max(n, 1), self.batch_size):
            part = {k: v[start : start + self.batch_size] for k, v in feeds.items()}
            chunks.append(self.session.run(None, part))
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.output_names))]

    def predict(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        return self.run(inputs)[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
