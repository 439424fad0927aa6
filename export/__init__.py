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
- ``runtime``: ``OnnxPredictor``, which never imports PyTorch.
- ``cli``: the ``export``, ``quantize``, ``inspect``, ``bench-model`` and
  ``predict`` subcommands of ``fedge``.

It must not import PyTorch at package import time: ``export.runtime`` and
``fedge predict`` run on devices that do not have it. Modules that need
PyTorch (``onnx_export``, ``sources``) import it themselves, and nothing
here imports the agent or the aggregator.
"""

from export.errors import ExportError, QualityError

__all__ = ["ExportError", "QualityError"]
