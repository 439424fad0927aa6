"""The device a quantized model is for, and what figures measured on this
host say about it.

Owns ``Evaluation``: how ``fedge quantize`` obtains the accuracy, agreement
and drop it reports for a target, on which host, and whether the latency it
measured is the target's or only the host's.

Theory. Every target fedge quantizes for computes int8 products exactly,
accumulated in 32 bits: ARM (NEON widening multiplies, SDOT, i8mm),
TensorRT on a Jetson, x86 with VNNI or AMX, and x86 without VNNI given
7-bit weights (the ``x86`` preset's ``reduce_range``), whose pair sums stay
below 2**15. The one arithmetic that differs is the host's own on x86
without VNNI, where ONNX Runtime's u8 x s8 kernels add two products in a
signed 16-bit lane and saturate there. Whether they do on this machine is
*measured* (``int8_products_exact``: a probe model whose exact answer is
known), not guessed from CPU flags.

Where they do, and the model's weights use the full 8-bit range, the
figures come from an *exact copy* of the quantized file
(``exact_int8_copy``): every int8 weight outside [-64, 63] that feeds an
integer operator is stored as uint8 plus 128 with its zero point moved by
128, which leaves every dequantized value, and so the model's function,
unchanged, and makes ONNX Runtime pick its exact u8 x u8 kernels. (ONNX
Runtime's own ``session.x64quantprecision`` does the same rewrite inside
the session, but in 1.32 it fails to load models that share a zero-point
initializer, such as a dynamically quantized Transformer, and it also
switches VNNI CPUs to the slower kernels.) The copy is checked on the probe
before it is trusted. The host's default kernels are measured too and shown
beside, never instead of, the target-faithful figures.

Latency is only ever the host's, measured on the file as shipped: it is the
target's only when the host is a CPU of the target's kind, and the report
says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedge.cpu import CpuInfo, host_cpu

TARGET_NAMES = {
    "arm64": "arm64 CPUs (Raspberry Pi, Jetson CPU)",
    "x86": "x86-64 CPUs",
    "jetson": "TensorRT on a Jetson",
}


@dataclass(frozen=True)
class Evaluation:
    target: str
    precision: str  # int8 | float16
    host: CpuInfo
    host_int8_exact: bool  # the host's default u8 x s8 kernels are exact (measured)
    exact_copy_works: bool  # an exact_int8_copy computes exact products on this host (measured)
    full_range_weights: bool  # int8 weights use 8 bits (no reduce_range)
    host_like_target: bool  # latency measured here is the target's kind of CPU

    @property
    def target_faithful(self) -> bool:
        """The reported figures are what the target computes."""
        return self.precision != "int8" or self.host_int8_exact or self.exact_copy_works or \
            not self.full_range_weights

    @property
    def host_default_differs(self) -> bool:
        """The host's default ONNX Runtime kernels would compute something else:
        the figures then come from an ``exact_int8_copy``."""
        return self.precision == "int8" and self.full_range_weights and not self.host_int8_exact

    @property
    def method(self) -> str:
        if self.precision != "int8":
            return "host-float16"
        if self.host_int8_exact:
            return "host-int8-kernels"
        return "exact-int8-copy" if self.full_range_weights else "host-int8-kernels-7bit-weights"

    def host_text(self) -> str:
        """The host as /proc/cpuinfo names it, with what was measured where the
        two disagree (under an emulator they can)."""
        cpu = self.host
        measured = ""
        if self.precision == "int8" and self.host_int8_exact == cpu.int8_saturation_expected:
            measured = f"; measured {'exact' if self.host_int8_exact else 'saturating'}"
        return f"{cpu.model or 'unknown CPU'} ({cpu.machine}, int8 via {cpu.int8_dot}{measured})"

    def summary(self) -> str:
        """One sentence: how the figures were obtained, and on which host."""
        host = f"(host: {self.host_text()})"
        if self.precision != "int8":
            return f"ONNX Runtime on this host; a device's float16 kernels may round differently {host}"
        if self.host_int8_exact:
            return f"ONNX Runtime's int8 kernels on this host, which multiply exactly as the target's do {host}"
        if not self.full_range_weights:
            return (f"ONNX Runtime's int8 kernels on this host, which saturate 16-bit pair sums that this model's "
                    f"7-bit weights cannot reach {host}")
        if self.exact_copy_works:
            return (f"an exact copy of the model (int8 weights stored as uint8 + 128: same values, exact u8 x u8 "
                    f"kernels), because this host's default int8 kernels saturate 16-bit pair sums and the "
                    f"target's do not {host}")
        return (f"ONNX Runtime on this host, which cannot compute exact int8 products: these are this host's "
                f"figures, not the target's {host}")

    def latency_label(self) -> str:
        where = f"this host, {self.host_text()}"
        if self.host_like_target:
            return f"measured on {where}, a CPU of the target's kind"
        target = TARGET_NAMES.get(self.target, self.target)
        return f"measured on {where}: the host's latency, not the target's ({target})"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "summary": self.summary(), "target": self.target,
                "target_faithful": self.target_faithful, "host": self.host.to_json(),
                "host_int8_products_exact": self.host_int8_exact,
                "exact_copy_products_exact": self.exact_copy_works,
                "latency_is_target": self.host_like_target}


def evaluation_for(target: str, precision: str, *, full_range_weights: bool, vnni: bool | None = None,
                   host: CpuInfo | None = None) -> Evaluation:
    """How figures for a model quantized for ``target`` are obtained on this host."""
    cpu = host or host_cpu()
    if precision == "int8":
        default_exact = int8_products_exact()
        copy_exact = default_exact or int8_products_exact(through_exact_copy=True)
    else:
        default_exact = copy_exact = True
    if target == "arm64":
        like = cpu.is_arm64
    elif target == "x86":
        like = cpu.is_x86 and bool(vnni) == (not cpu.int8_saturation_expected)
    else:  # jetson: TensorRT on the GPU, which a CPU session never is
        like = False
    return Evaluation(target, precision, cpu, default_exact, copy_exact, full_range_weights, like)


# --- the exact copy ----------------------------------------------------------------------

# Integer operators whose weight ONNX Runtime multiplies with u8 x s8 kernels:
# op type -> [(weight input, zero-point input, scale input or None)].
_INT8_WEIGHTS: dict[str, list[tuple[int, int, int | None]]] = {
    "MatMulInteger": [(1, 3, None)],
    "QLinearMatMul": [(3, 5, 4)],
    "QLinearConv": [(3, 5, 4)],
    "DequantizeLinear": [(0, 2, 1)],
    "DynamicQuantizeMatMul": [(1, 3, 2)],
    "MatMulIntegerToFloat": [(1, 5, 3)],
    "QGemm": [(3, 5, 4)],
    "QAttention": [(1, 7, 4)],
    "DynamicQuantizeLSTM": [(1, 9, 8), (2, 11, 10)],
}


def exact_int8_copy(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` (an ``onnx.ModelProto``) whose int8 weights outside
    [-64, 63] are uint8 + 128 with zero points + 128: the same dequantized
    values, computed by exact u8 x u8 kernels. Returns the copy and the number
    of int8 weights it could not move (their zero point is computed at run
    time), which the caller must treat as not exact."""
    import onnx
    from onnx import TensorProto, numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    inits = {t.name: t for t in graph.initializer}
    moved: dict[str, str] = {}  # int8 initializer -> its uint8 twin (shared ones are moved once)
    stuck = 0

    def twin(name: str, values: np.ndarray) -> str:
        if name not in moved:
            shifted = (values.astype(np.int16) + 128).astype(np.uint8)
            new = _fresh_name(f"{name}_u8", inits)
            tensor = numpy_helper.from_array(shifted, new)
            graph.initializer.append(tensor)
            inits[new] = tensor
            moved[name] = new
        return moved[name]

    for node in graph.node:
        for w_idx, zp_idx, scale_idx in _INT8_WEIGHTS.get(node.op_type, []):
            weight = inits.get(node.input[w_idx]) if len(node.input) > w_idx else None
            if weight is None or weight.data_type != TensorProto.INT8:
                continue  # activations are u8, or moved to u8 by ONNX Runtime's own QDQ rewrite
            values = numpy_helper.to_array(weight)
            if values.size == 0 or (values.min() >= -64 and values.max() <= 63):
                continue  # 7-bit weights cannot saturate a pair sum
            zp_name = node.input[zp_idx] if len(node.input) > zp_idx else ""
            if zp_name and zp_name not in inits:
                stuck += 1  # a zero point computed at run time cannot be moved with its weight
                continue
            if zp_name:
                zp_values = numpy_helper.to_array(inits[zp_name])
            else:
                scale = node.input[scale_idx] if scale_idx is not None and len(node.input) > scale_idx else ""
                zp_name = f"{weight.name}__zero_point"
                zp_values = np.zeros(tuple(inits[scale].dims) if scale in inits else (), np.int8)
                while len(node.input) <= zp_idx:
                    node.input.append("")
            node.input[w_idx] = twin(weight.name, values)
            node.input[zp_idx] = twin(zp_name, zp_values)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    orphans = [t for t in graph.initializer if t.name in moved and t.name not in used]
    for tensor in orphans:
        graph.initializer.remove(tensor)
    return copy, stuck


def _fresh_name(base: str, taken: Any) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _probe_model() -> Any:
    """8 products of 255 x 127 (64,770 per pair): exactly 259,080; a kernel that
    saturates pairs at 16 bits returns 131,068."""
    from onnx import TensorProto, helper, numpy_helper

    k = 8
    weights = numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@lru_cache(maxsize=2)
def int8_products_exact(through_exact_copy: bool = False) -> bool:
    """Measure whether ONNX Runtime computes exact int8 products on this CPU,
    with its default kernels or (``through_exact_copy``) on an exact copy."""
    import onnxruntime as ort

    from fedge.onnxrt import session_options

    model = _probe_model()
    if through_exact_copy:
        model, _ = exact_int8_copy(model)
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(1),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": np.full((1, 8), 255, np.uint8)})[0]
    return int(got.reshape(-1)[0]) == 255 * 127 * 8


def write_exact_int8_copy(model_path: str | Path, out_path: str | Path) -> Path:
    """``exact_int8_copy`` of the file at ``model_path``, saved at ``out_path``."""
    import onnx

    from export.errors import ExportError

    copy, stuck = exact_int8_copy(onnx.load(str(model_path)))
    if stuck:
        raise ExportError(f"{Path(model_path).name} has {stuck} int8 weights whose zero point is computed at run time, "
                          "which no copy can move to exact kernels on this host; evaluate it on an arm64 machine or "
                          "an x86 CPU with VNNI")
    onnx.save_model(copy, str(out_path))
    return Path(out_path)


def target_outputs(model_path: str | Path, inputs: Any, *, threads: int | None = None,
                   evaluation: Evaluation | None = None, progress: Any = None) -> np.ndarray:
    """The first output of the model at ``model_path`` on ``inputs``, as its
    target computes it: from the file itself where this host's int8 kernels
    are exact (or ``evaluation`` says they agree with the target's), else from
    its exact copy."""
    import tempfile

    from fedge.onnxrt import OnnxPredictor

    needs_copy = evaluation.host_default_differs if evaluation is not None else not int8_products_exact()
    if not needs_copy:
        return OnnxPredictor(model_path, threads).predict(inputs, progress)
    with tempfile.TemporaryDirectory(prefix="fedge-exact-") as tmp:
        copy = write_exact_int8_copy(model_path, Path(tmp) / Path(model_path).name)
        return OnnxPredictor(copy, threads).predict(inputs, progress)
