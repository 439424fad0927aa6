"""PyTorch -> ONNX -> quantized ONNX for fedge devices, with proof that the
result still gives the same answers.

This package owns the ML engineer's toolchain and the small ONNX Runtime
helper an inference-only device runs:

- ``signature``: the input contract of an exported model (``x:1x64:float32``).
- ``onnx_export``: export with ``torch.onnx.export(dynamo=True)``, an explicit
  opset, one self-contained file, and parity checks against PyTorch.
- ``opsets``: moving the exporter's output to the opset and IR version the
  devices accept.
- ``sources``: building the model from its factory and loading weights
  (state dict, safetensors, or a fedge global-model message).
- ``manifest``: the JSON that travels beside every ``.onnx`` file.
- ``quantize`` and ``fp16``: static/dynamic int8 and float16 variants.
- ``data``: calibration and evaluation sets from ``.npz`` files or data specs.
- ``report``: accuracy, top-1 agreement, size and latency of two models.
- ``inspection``: a summary of an ``.onnx`` file and its manifest.
- ``cli``: the ``export``, ``quantize``, ``inspect``, ``bench-model`` and
  ``predict`` subcommands of ``fedge``.

It must not import PyTorch at package import time: ``fedge predict`` runs
on devices that do not have it (its ONNX Runtime side is ``fedge.onnxrt``,
shared with the inference-only agent). Modules that need
PyTorch (``onnx_export``, ``sources``) import it themselves, and nothing
here imports the agent or the aggregator.
"""

from typing import Any

from export.errors import ExportError, QualityError

# The public API, imported on first use so that ``import export`` stays
# free of PyTorch and ONNX (``from export import OnnxPredictor`` on a device
# loads ONNX Runtime and NumPy only).
_LAZY = {
    "InputSpec": "export.signature",
    "parse_input_spec": "export.signature",
    "export_model": "export.onnx_export",
    "export_from_factory": "export.onnx_export",
    "export_global_model": "export.onnx_export",
    "verify_parity": "export.onnx_export",
    "ExportResult": "export.onnx_export",
    "quantize_model": "export.quantize",
    "QuantizeResult": "export.quantize",
    "compare_models": "export.report",
    "inspect_model": "export.inspection",
    "OnnxPredictor": "fedge.onnxrt",
}

__all__ = ["ExportError", "QualityError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
