"""The manifest: a JSON file beside every ``.onnx`` this package writes.

Owns its location (``model.onnx`` -> ``model.manifest.json``), its fields and
reading it back. A device or an operator can tell from it, without loading
the model, what the file is (sha256, size, opset, IR version, inputs and
outputs), where it came from (factory, arguments, weights digest, global
round) and how it was checked (parity, quantization settings, tool
versions). No PyTorch here.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.files import sha256_file, write_json

FORMAT = "fedge-onnx-manifest/1"
_TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "fedge")
_ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
    11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


def manifest_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".manifest.json") if p.suffix == ".onnx" else p.with_name(p.name + ".manifest.json")


def tool_versions() -> dict[str, str | None]:
    """Versions from package metadata, so recording torch's does not import it."""
    out: dict[str, str | None] = {}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _value_info(vi: Any) -> dict[str, Any]:
    t = vi.type.tensor_type
    shape: list[int | str] = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                              for d in t.shape.dim]
    return {"name": vi.name, "shape": shape, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))}


def describe_onnx(path: str | Path, model: Any = None) -> dict[str, Any]:
    """What the file itself says: digest, size, opsets and signature."""
    import onnx

    p = Path(path)
    m = model if model is not None else onnx.load(str(p), load_external_data=False)
    opsets = {imp.domain or "ai.onnx": int(imp.version) for imp in m.opset_import}
    init_names = {i.name for i in m.graph.initializer}
    return {
        "file": p.name,
        "sha256": sha256_file(p),
        "size_bytes": p.stat().st_size,
        "opset": opsets.get("ai.onnx", 0),
        "opset_imports": opsets,
        "ir_version": int(m.ir_version),
        "inputs": [_value_info(v) for v in m.graph.input if v.name not in init_names],
        "outputs": [_value_info(v) for v in m.graph.output],
    }


def count_parameters(model: Any) -> int:
    """Elements of the non-scalar initializers of an ONNX graph: the weights,
    whatever their precision (quantization scales are scalars or short)."""
    import numpy as np

    total = 0
    for init in model.graph.initializer:
        dims = list(init.dims)
        if len(dims) >= 1 and int(np.prod(dims)) > 1:
            total += int(np.prod(dims))
    return total


def build_manifest(path: str | Path, *, precision: str, parameters: int, source: dict[str, Any],
                   model: Any = None, **sections: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"format": FORMAT}
    out.update(describe_onnx(path, model))
    out["precision"] = precision
    out["parameters"] = int(parameters)
    out["source"] = source
    for key, value in sections.items():
        if value is not None:
            out[key] = value
    out["tools"] = tool_versions()
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def write_manifest(model_path: str | Path, manifest: dict[str, Any]) -> Path:
    return write_json(manifest_path(model_path), manifest)


def read_manifest(model_path: str | Path) -> dict[str, Any] | None:
    p = manifest_path(model_path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"manifest {str(p)!r} is not valid JSON ({exc}); re-export the model") from None
    if not isinstance(data, dict):
        raise ExportError(f"manifest {str(p)!r} is not a JSON object; re-export the model")
    return data


def record_evaluation(model_path: str | Path, comparison: dict[str, Any]) -> Path:
    """Add how the model compared with its float parent, and how and where
    those figures were obtained, to the model's manifest."""
    manifest = read_manifest(model_path)
    if manifest is None:
        raise ExportError(f"{Path(model_path).name} has no manifest to record its evaluation in; re-run the command")
    keep = ("size_ratio", "eval_rows", "top1_agreement", "accuracy_drop_points", "max_abs_diff", "mse", "snr_db",
            "evaluation", "host_default_kernels")
    doc = {k: comparison.get(k) for k in keep}
    doc["accuracy"] = comparison["candidate"].get("accuracy")
    doc["reference_accuracy"] = comparison["reference"].get("accuracy")
    doc["latency"] = {"float32": comparison["reference"].get("latency"), manifest.get("precision", "candidate"):
                      comparison["candidate"].get("latency")}
    manifest["evaluation"] = doc
    return write_manifest(model_path, manifest)
