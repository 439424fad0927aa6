"""Which ONNX opset and IR version an exported file carries, and moving it
down to what the devices accept.

Why a default of opset 17: it is the newest opset that every runtime in a
fedge fleet reads. ONNX Runtime has run opset 17 since 1.14 (every aarch64
wheel a Raspberry Pi installs today); TensorRT 8.6 (JetPack 6.0) documents
its ONNX parser up to opset 17, and TensorRT 10 (JetPack 6.1+) accepts it
too. Opset 18 moved the reduce operators' ``axes`` from attributes to
inputs, which TensorRT 8.6 does not parse.

The dynamo exporter only has implementations for opset 18 and newer, so for
a lower target we export at 18 and convert here with the ONNX version
converter, then repair what that converter gets wrong (it leaves the
opset-18-only ``noop_with_empty_axes`` attribute on ReduceMean/Max/...),
and check the result with the ONNX checker. The IR version is lowered to the
oldest one that can describe the opsets used, so older ONNX Runtime builds
(Jetson wheels lag behind) can still load the file.
"""

from __future__ import annotations

import re

import onnx
from onnx import ModelProto, TensorProto

from export.errors import ExportError
from fedge.errors import one_line

DEFAULT_OPSET = 17
EXPORTER_MIN_OPSET = 18
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear per-channel (axis) needs 13

# Reduce ops whose opset-13 form has no noop_with_empty_axes attribute (ReduceSum has had it since 13).
_REDUCE_WITHOUT_NOOP = {
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSumSquare",
}
# Element types that need an IR version newer than the opsets alone would ask for.
_NEW_IR_TYPES = {
    getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "INT4", "UINT4",
                                      "FLOAT4E2M1")
    if hasattr(TensorProto, n)
}


def default_domain_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {opset} is outside {MIN_OPSET}..{onnx.defs.onnx_opset_version()}; "
                          f"use {DEFAULT_OPSET} (ONNX Runtime and TensorRT 8.6/10) unless a device needs another")
    return opset


def convert_opset(model: ModelProto, target: int) -> ModelProto:
    """Return ``model`` at default-domain opset ``target`` (down or up)."""
    current = default_domain_opset(model)
    if current == target:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise ExportError(_conversion_failure(exc, current, target)) from None
    _repair_reduce_attributes(converted)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise ExportError(_conversion_failure(exc, current, target)) from None
    return converted


def _conversion_failure(exc: Exception, current: int, target: int) -> str:
    text = one_line(exc, 160)
    op = re.search(r"[Oo]p(?:erator|_type|Type)?[:= ]+\(?['\"]?([A-Z][A-Za-z0-9]+)", text)
    what = f"operator {op.group(1)}" if op else "an operator"
    return (f"cannot convert the exported graph from opset {current} to opset {target}: {what} has no equivalent "
            f"there ({text}); use --opset {current} (ONNX Runtime and TensorRT 10 accept it; "
            "TensorRT 8.6 needs 17)")


def _repair_reduce_attributes(model: ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type not in _REDUCE_WITHOUT_NOOP or node.domain not in ("", "ai.onnx"):
            continue
        for i, attr in enumerate(node.attribute):
            if attr.name == "noop_with_empty_axes":
                if attr.i != 0:
                    raise ExportError(f"{node.op_type} node {node.name!r} reduces over an empty axis list, which "
                                      "opset 17 cannot express; use --opset 18")
                del node.attribute[i]
                break


def lower_ir_version(model: ModelProto) -> None:
    """Set the oldest IR version that can hold ``model``'s opsets and types."""
    if _uses_new_types(model):
        return
    try:
        wanted = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:
        return
    if wanted >= model.ir_version:
        return
    original = model.ir_version
    model.ir_version = wanted
    try:
        onnx.checker.check_model(model)
    except Exception:
        model.ir_version = original


def _uses_new_types(model: ModelProto) -> bool:
    g = model.graph
    types = {t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types.add(vi.type.tensor_type.elem_type)
    return bool(types & _NEW_IR_TYPES)


def drop_unused_domains(model: ModelProto) -> None:
    """Remove opset imports of domains no node uses (ORT's quantizer declares
    every domain it knows, training and PyTorch-ATen ones included, which
    stricter parsers such as TensorRT's then have to ignore)."""
    used = {n.domain or "" for n in model.graph.node}
    for f in model.functions:
        used.update(n.domain or "" for n in f.node)
        used.add(f.domain)
    keep = [imp for imp in model.opset_import if (imp.domain or "") in used or imp.domain in ("", "ai.onnx")]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
