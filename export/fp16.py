"""Float32 -> float16 conversion of an ONNX graph, keeping float32 where it
must stay.

Owns one transformation: weights and activations become float16, graph
inputs and outputs stay float32 (a Cast is inserted after each input and
before each output), so callers feed and read the same arrays as with the
float32 model. A node stays float32, with Casts around it, when
- its operator has float-only inputs or dtype attributes in the ONNX spec
  (Resize's scales, Range, random generators),
- it is outside the default ONNX domain (contrib ops have their own type
  constraints) or carries a subgraph (If, Loop, Scan),
- or ONNX Runtime cannot run it in float16 on this machine: the converted
  model is loaded (in a child process, with ORT_ENABLE_ALL), and each
  operator ORT has no float16 kernel for is added to the float32 list until
  it loads. CPU builds differ: x86 ORT lacks float16 kernels that aarch64
  builds have, and ORT 1.2x's x86-only NCHWc optimizer was seen to crash on
  float16 Transpose/Mul chains of a Transformer; when loading crashes, the
  least used operator whose float32 fallback avoids the crash is kept in
  float32 and the result says so.

Weights are clipped to the float16 range (+-65504); the count of values
that overflowed or flushed to zero is reported. Needs ``onnx`` and
``onnxruntime`` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from export.errors import ExportError
from fedge.errors import first_line, one_line

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest subnormal
ALWAYS_FLOAT32 = frozenset({
    "Resize", "Upsample", "Range", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Multinomial", "Bernoulli", "NonMaxSuppression", "RoiAlign", "TopK", "STFT", "DFT", "CumSum",
})
_FLOAT = TensorProto.FLOAT
_HALF = TensorProto.FLOAT16
_MISSING_KERNEL = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")


@dataclass
class Fp16Result:
    model: ModelProto
    float32_ops: list[str] = field(default_factory=list)
    overflowed: int = 0
    flushed_to_zero: int = 0
    notes: list[str] = field(default_factory=list)


def convert_to_float16(model: ModelProto, keep_float32: Iterable[str] = (), check_with_ort: bool = True,
                       max_rounds: int = 30) -> Fp16Result:
    """Return a float16 copy of ``model`` with float32 inputs and outputs."""
    blocked = set(ALWAYS_FLOAT32) | set(keep_float32)
    notes: list[str] = []
    for _ in range(max_rounds):
        result = _convert(model, blocked)
        if not check_with_ort:
            return result
        status = _probe(result.model)
        if status == "ok":
            result.float32_ops = sorted(blocked & _ops_in(model))
            result.notes = notes
            return result
        if status.startswith("missing:"):
            op = status.split(":", 1)[1]
            if op in blocked:
                raise ExportError(f"ONNX Runtime has no kernel for {op} even in float32; use --mode static or "
                                  "dynamic instead of fp16")
            blocked.add(op)
            continue
        if status == "crash":
            op = _first_op_that_avoids_crash(model, blocked)
            blocked.add(op)
            notes.append(f"kept {op} in float32: ONNX Runtime crashed optimizing it in float16 on this CPU")
            continue
        raise ExportError(f"ONNX Runtime rejected the float16 model: {one_line(status)}")
    raise ExportError("float16 conversion did not converge; use --mode static or dynamic instead of fp16")


def _ops_in(model: ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


_PROBE = """
import sys, onnxruntime as ort
opts = ort.SessionOptions()
opts.log_severity_level = 4
try:
    ort.InferenceSession(sys.argv[1], sess_options=opts, providers=["CPUExecutionProvider"])
except Exception as exc:
    print(str(exc).replace("\\n", " "))
    sys.exit(3)
"""


def _probe(model: ModelProto) -> str:
    """Load the model in a child process with ORT_ENABLE_ALL: ``ok``,
    ``missing:<Op>`` (no float16 kernel), ``crash`` or the error text. A
    child, because some ONNX Runtime builds crash (SIGSEGV) in graph
    optimizers on float16 graphs, and that must not take this process down."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/probe.onnx"
        onnx.save_model(model, path)
        proc = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return "ok"
    if proc.returncode < 0:
        return "crash"
    m = _MISSING_KERNEL.search(proc.stdout)
    if m:
        return f"missing:{m.group(1)}"
    return " ".join(proc.stdout.split()) or f"exit code {proc.returncode}"


def _first_op_that_avoids_crash(model: ModelProto, blocked: set[str]) -> str:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type not in blocked and n.domain in ("", "ai.onnx"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    for op in sorted(counts, key=lambda o: (counts[o], o)):
        if _probe(_convert(model, blocked | {op}).model) != "crash":
            return op
    raise ExportError("ONNX Runtime crashes loading the float16 model on this machine; use --mode static or dynamic")


@dataclass
class _Conversion:
    """The graph being converted, shared by the passes of ``_convert``.

    ``nodes`` are standalone copies (protobuf hands out a fresh wrapper per
    access, so the identity of ``graph.node`` elements is not stable);
    ``half_nodes`` holds the ids of those that run in float16 and
    ``half_tensors`` the names of the float tensors that are float16 after
    conversion."""

    model: ModelProto
    nodes: list[onnx.NodeProto]
    half_nodes: set[int]
    consumers: dict[str, list[onnx.NodeProto]]
    types: dict[str, int]
    result: Fp16Result
    half_tensors: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, source: ModelProto, blocked: set[str]) -> _Conversion:
        model = ModelProto()
        model.CopyFrom(source)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            inferred = model
        nodes = []
        for n in model.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            nodes.append(copy)
        del model.graph.node[:]
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in nodes:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        half = {id(n) for n in nodes if _runs_in_half(n, blocked)}
        return cls(model, nodes, half, consumers, _elem_types(inferred), Fp16Result(model=model))

    def is_half(self, node: onnx.NodeProto) -> bool:
        return id(node) in self.half_nodes

    def rename_input(self, users: Iterable[onnx.NodeProto], old: str, new: str) -> None:
        for u in users:
            for j, name in enumerate(u.input):
                if name == old:
                    u.input[j] = new


def _runs_in_half(node: onnx.NodeProto, blocked: set[str]) -> bool:
    if node.op_type in blocked or node.domain not in ("", "ai.onnx"):
        return False
    return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _convert(source: ModelProto, blocked: set[str]) -> Fp16Result:
    """One conversion, as a sequence of passes over the graph."""
    work = _Conversion.of(source, blocked)
    tail = _outputs_back_to_float32(work)
    _initializers_to_half(work)
    _constants_to_half(work)
    casts = _casts_between_precisions(work)
    g = work.model.graph
    g.node.extend([*casts, *tail])
    # Intermediate type annotations are stale now; ORT and the checker re-infer them.
    del g.value_info[:]
    try:
        onnx.checker.check_model(work.model)
    except Exception as exc:
        raise ExportError(f"float16 conversion produced an invalid graph: {first_line(exc)}") from None
    return work.result


def _outputs_back_to_float32(work: _Conversion) -> list[onnx.NodeProto]:
    """A graph output that a float16 node produces is renamed, and a Cast back
    to float32 under its own name is appended (returned, to go last)."""
    output_names = {o.name for o in work.model.graph.output}
    tail = []
    for n in work.nodes:
        if not work.is_half(n):
            continue
        for i, out in enumerate(n.output):
            if out in output_names and work.types.get(out) == _FLOAT:
                inner = f"{out}__fp16"
                n.output[i] = inner
                work.rename_input(work.consumers.get(out, []), out, inner)
                work.consumers[inner] = work.consumers.pop(out, [])
                work.types[inner] = _FLOAT
                tail.append(helper.make_node("Cast", [inner], [out], to=_FLOAT, name=f"{out}__to_fp32"))
    return tail


def _initializers_to_half(work: _Conversion) -> None:
    """Weights used only by float16 nodes become float16 in place; weights
    shared with float32 nodes get a float16 copy for the float16 users."""
    g = work.model.graph
    copies: list[TensorProto] = []
    for init in g.initializer:
        if init.data_type != _FLOAT:
            continue
        users = work.consumers.get(init.name, [])
        if users and all(work.is_half(u) for u in users):
            init.CopyFrom(_to_half_tensor(init, init.name, work.result))
            work.half_tensors.add(init.name)
        elif any(work.is_half(u) for u in users):
            copy = _to_half_tensor(init, f"{init.name}__fp16", work.result)
            copies.append(copy)
            work.half_tensors.add(copy.name)
            work.rename_input([u for u in users if work.is_half(u)], init.name, copy.name)
    g.initializer.extend(copies)


def _constants_to_half(work: _Conversion) -> None:
    """Constant nodes whose every user runs in float16 hold float16 values;
    the Constant itself is then left as it is (not converted again)."""
    for node in work.nodes:
        if node.op_type != "Constant" or not node.output:
            continue
        value = next((a for a in node.attribute if a.name == "value"), None)
        users = work.consumers.get(node.output[0], [])
        if value is None or value.t.data_type != _FLOAT or not users:
            continue
        if all(work.is_half(u) for u in users):
            value.t.CopyFrom(_to_half_tensor(value.t, value.t.name, work.result))
            work.half_tensors.add(node.output[0])
            work.half_nodes.discard(id(node))


def _casts_between_precisions(work: _Conversion) -> list[onnx.NodeProto]:
    """Put the nodes back in order, with a Cast wherever a float tensor
    crosses between a float16 and a float32 node (one Cast per tensor and
    direction), and float16 nodes' type attributes retyped."""
    out: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            suffix = "fp16" if to == _HALF else "fp32"
            casts[(name, to)] = f"{name}__{suffix}"
            out.append(helper.make_node("Cast", [name], [casts[(name, to)]], to=to, name=f"{name}__cast_{suffix}"))
        return casts[(name, to)]

    for n in work.nodes:
        half = work.is_half(n)
        for j, name in enumerate(n.input):
            if not name or (work.types.get(name) != _FLOAT and name not in work.half_tensors):
                continue
            is_half = name in work.half_tensors
            if half != is_half:
                n.input[j] = cast(name, _HALF if half else _FLOAT)
        if half:
            _retype_attributes(n, work.result)
            for output in n.output:
                if work.types.get(output) == _FLOAT or (n.op_type == "Cast" and _cast_target(n) == _HALF):
                    work.half_tensors.add(output)
        out.append(n)
    return out


def _elem_types(model: ModelProto) -> dict[str, int]:
    g = model.graph
    types: dict[str, int] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _cast_target(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), 0)


def _retype_attributes(node: onnx.NodeProto, result: Fp16Result) -> None:
    """Attributes that name the float type of a float16 node's output."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == _FLOAT:
            a.i = _HALF
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == _FLOAT:
            a.t.CopyFrom(_to_half_tensor(a.t, a.t.name, result))


def _to_half_tensor(t: TensorProto, name: str, result: Fp16Result) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    finite = np.isfinite(arr)
    result.overflowed += int(np.sum(finite & (np.abs(arr) > FP16_MAX)))
    result.flushed_to_zero += int(np.sum((arr != 0) & (np.abs(arr) < FP16_TINY)))
    half = np.where(finite, np.clip(arr, -FP16_MAX, FP16_MAX), arr).astype(np.float16)
    return numpy_helper.from_array(half, name)
