"""A readable summary of one ``.onnx`` file and its manifest.

Owns ``fedge inspect``: signature, opsets, IR version, size, parameter
count, a histogram of operator types, whether (and how) it is quantized,
and whether the file's sha256 still matches what its manifest recorded.
Needs ``onnx`` (not PyTorch).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.manifest import count_parameters, describe_onnx, manifest_path, read_manifest
from fedge.errors import first_line

_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def inspect_model(path: str | Path) -> dict[str, Any]:
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"ONNX model {str(p)!r} not found; check the path")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{p.name} is not a readable ONNX file: {first_line(exc)}") from None
    if not model.opset_import or not model.graph.node:
        size = p.stat().st_size
        raise ExportError(f"{p.name} is not an ONNX model ({'an empty file' if size == 0 else f'{size} bytes'} with "
                          "no graph or opset); export one with fedge export")
    info = describe_onnx(p, model)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    dtypes = Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer
                     if t.data_type != onnx.TensorProto.UNDEFINED)
    quant_ops = sorted(op for op in ops if op.split(".")[-1] in _QUANT_OPS)
    if quant_ops:
        precision = "int8 (" + ("QDQ static" if "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops
                                else "dynamic") + ")"
    elif dtypes.get("float16"):
        precision = "float16"
    else:
        precision = "float32"
    info.update({
        "parameters": count_parameters(model),
        "nodes": sum(ops.values()),
        "op_types": dict(ops.most_common()),
        "initializer_dtypes": dict(dtypes),
        "quantized": bool(quant_ops),
        "precision": precision,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    })
    manifest = read_manifest(p)
    mpath = manifest_path(p)
    if manifest is None:
        info["manifest"] = {"file": mpath.name, "present": False, "sha256_match": None}
    else:
        info["manifest"] = {"file": mpath.name, "present": True,
                            "sha256_match": manifest.get("sha256") == info["sha256"],
                            "precision": manifest.get("precision"), "source": manifest.get("source"),
                            "created": manifest.get("created"), "tools": manifest.get("tools"),
                            "quantization": manifest.get("quantization"),
                            "verification_passed": (manifest.get("verification") or {}).get("passed"),
                            "evaluation": manifest.get("evaluation")}
    return info


def format_summary(info: dict[str, Any]) -> str:
    def sig(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"{i['name']}: {'x'.join(str(d) for d in i['shape'])} {i['dtype']}" for i in items)

    m = info["manifest"]
    lines = [
        f"{info['file']}  ({info['size_bytes'] / 1024:.1f} kB, sha256 {info['sha256'][:16]}...)",
        f"  precision   {info['precision']}",
        f"  opset       {info['opset']} (IR version {info['ir_version']}; "
        + ", ".join(f"{k} {v}" for k, v in info["opset_imports"].items()) + ")",
        f"  inputs      {sig(info['inputs'])}",
        f"  outputs     {sig(info['outputs'])}",
        f"  parameters  {info['parameters']:,}   nodes {info['nodes']}",
        "  op types    " + ", ".join(f"{k} {v}" for k, v in info["op_types"].items()),
    ]
    if not m["present"]:
        lines.append(f"  manifest    {m['file']} missing: provenance and digest cannot be checked")
    else:
        verdict = "matches" if m["sha256_match"] else "DOES NOT MATCH (the file changed after export)"
        lines.append(f"  manifest    {m['file']}: sha256 {verdict}")
        src = m.get("source") or {}
        if src:
            origin = f"{src.get('factory')} {src.get('factory_args') or ''}".strip()
            if src.get("global_round") is not None:
                origin += f", global round {src['global_round']} of job {src.get('job')}"
            lines.append(f"  source      {origin}")
        if m.get("quantization"):
            q = m["quantization"]
            lines.append(f"  quantized   {q.get('mode')} for {q.get('target')} (method {q.get('method')}, "
                         f"per-channel {q.get('per_channel')}, activations {q.get('activation_type')}, "
                         f"weights {q.get('weight_type')}, reduce_range {q.get('reduce_range')})")
        ev = m.get("evaluation") or {}
        if ev.get("accuracy") is not None and ev.get("reference_accuracy") is not None:
            how = (ev.get("evaluation") or {}).get("method", "?")
            agreement = (ev.get("top1_agreement") or 0) * 100
            lines.append(f"  evaluated   accuracy {ev['accuracy'] * 100:.2f}% (float32 "
                         f"{ev['reference_accuracy'] * 100:.2f}%, {ev.get('eval_rows')} rows), top-1 agreement "
                         f"{agreement:.2f}%; method {how}")
        if m.get("verification_passed") is not None:
            lines.append(f"  parity      {'passed' if m['verification_passed'] else 'FAILED'} at export")
        lines.append(f"  created     {m.get('created')}")
    return "\n".join(lines)
