"""Float32 ONNX -> int8 (static QDQ or dynamic) or float16 ONNX.

Owns the choice of quantization settings per target device and the call
into ``onnxruntime.quantization``:

- ONNX Runtime's pre-processing runs first (``quant_pre_process``: symbolic
  shape inference, graph optimization such as Conv+BatchNorm folding, and
  ONNX shape inference), as its quantization guide asks.
- ``static``: QDQ format (QuantizeLinear/DequantizeLinear pairs, which ORT
  fuses into integer kernels and TensorRT reads as explicit quantization),
  activation ranges from a calibration set with MinMax, Entropy or
  Percentile calibration, weights per channel or per tensor.
- ``dynamic``: int8 weights, activations quantized at run time; for
  RNN/Transformer-style models whose activation ranges vary per input.
- ``fp16``: ``export.fp16``.

Targets (see ``TARGETS``):
- ``arm64`` (Raspberry Pi, Jetson CPU): S8S8 - int8 activations and int8
  weights, full 8-bit range (ARM's int8 dot-product kernels do not saturate).
- ``x86``: U8S8 - uint8 activations, int8 weights. Without VNNI the 16-bit
  intermediate of the u8*s8 multiply-add (vpmaddubsw) can saturate, so
  weights use 7 bits (``reduce_range=True``); with VNNI (``--vnni``) it
  cannot, and the full range is kept.
- ``jetson``: S8S8 QDQ with symmetric activations and weights (TensorRT
  requires zero points of 0), plus a TensorRT execution-provider options
  file next to the model. No calibration table is written: TensorRT refuses
  one for a model that already carries Q/DQ nodes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export import opsets
from export.errors import ExportError
from export.files import check_outputs, replace_atomically, sha256_file, temp_path_beside, write_json
from export.manifest import build_manifest, count_parameters, manifest_path, read_manifest, write_manifest
from fedge.errors import first_line
from fedge.progress import Progress

MODES = ("static", "dynamic", "fp16")
METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("arm64", "x86", "jetson")
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class QuantConfig:
    mode: str
    target: str
    method: str | None
    per_channel: bool
    activation_type: str | None
    weight_type: str | None
    reduce_range: bool
    symmetric_activations: bool
    vnni: bool | None = None

    @property
    def precision(self) -> str:
        return "float16" if self.mode == "fp16" else "int8"

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["format"] = "QDQ" if self.mode == "static" else ("dynamic" if self.mode == "dynamic" else "fp16")
        return out


def resolve_config(mode: str = "static", target: str = "arm64", *, method: str = "minmax",
                   per_channel: bool = True, vnni: bool | None = None) -> QuantConfig:
    if mode not in MODES:
        raise ExportError(f"--mode {mode!r} is not known; use one of {', '.join(MODES)}")
    if target not in TARGETS:
        raise ExportError(f"--target {target!r} is not known; use one of {', '.join(TARGETS)}")
    if method not in METHODS:
        raise ExportError(f"--method {method!r} is not known; use one of {', '.join(METHODS)}")
    if vnni is not None and target != "x86":
        raise ExportError("--vnni/--no-vnni only applies to --target x86")
    if mode == "fp16":
        return QuantConfig("fp16", target, None, False, None, None, False, False)
    if target == "jetson" and mode == "dynamic":
        raise ExportError("--target jetson needs --mode static (TensorRT does not run dynamically quantized "
                          "operators) or --mode fp16")
    if target == "x86":
        reduce = not bool(vnni)
        return QuantConfig(mode, target, method if mode == "static" else None, per_channel,
                           "uint8" if mode == "static" else None, "int8", reduce, False, bool(vnni))
    return QuantConfig(mode, target, method if mode == "static" else None, per_channel,
                       "int8" if mode == "static" else None, "int8", False, target == "jetson")


@dataclass
class QuantizeResult:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    config: QuantConfig
    trt_options_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def trt_options_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".trt.json") if p.suffix == ".onnx" else p.with_name(p.name + ".trt.json")


def quantize_model(float_path: str | Path, out_path: str | Path, *, mode: str = "static",
                   calibration: Mapping[str, np.ndarray] | None = None, method: str = "minmax",
                   per_channel: bool = True, target: str = "arm64", vnni: bool | None = None,
                   force: bool = False, calibration_source: Mapping[str, Any] | None = None,
                   extra_manifest: Mapping[str, Any] | None = None) -> QuantizeResult:
    """Quantize ``float_path`` into ``out_path`` and write its manifest (and,
    for ``target='jetson'``, the TensorRT options file).

    ``calibration`` maps input names to arrays (rows = examples); it is
    required for ``mode='static'``.
    """
    cfg = resolve_config(mode, target, method=method, per_channel=per_channel, vnni=vnni)
    src, out = Path(float_path), Path(out_path)
    if not src.is_file():
        raise ExportError(f"float model {str(src)!r} not found; export it first with fedge export")
    outputs = [out, manifest_path(out)] + ([trt_options_path(out)] if target == "jetson" else [])
    check_outputs(outputs, force)
    if src.resolve() == out.resolve():
        raise ExportError("the quantized model must go to a different path than the float model")
    import onnx

    float_model = onnx.load(str(src))
    input_names = [i.name for i in float_model.graph.input if i.name not in {t.name for t in
                                                                             float_model.graph.initializer}]
    if cfg.mode == "static":
        if not calibration:
            raise ExportError("static quantization needs calibration data: give --calibration FILE.npz or a data "
                              "spec such as fedge.datasets:digits")
        missing = [n for n in input_names if n not in calibration]
        if missing:
            raise ExportError(f"calibration data lacks arrays for model inputs {missing}")

    notes: list[str] = []
    tmp = temp_path_beside(out, ".onnx")
    try:
        if cfg.mode == "fp16":
            from export.fp16 import convert_to_float16

            converted = convert_to_float16(float_model)
            onnx.save_model(converted.model, str(tmp))
            notes.extend(converted.notes)
            if converted.float32_ops:
                notes.append(f"kept in float32: {', '.join(converted.float32_ops)}")
            if converted.overflowed or converted.flushed_to_zero:
                notes.append(f"{converted.overflowed} weights clipped to +-65504, {converted.flushed_to_zero} "
                             "tiny weights flushed to zero")
        else:
            _quantize_int8(src, tmp, cfg, calibration, input_names, notes)
        quantized = onnx.load(str(tmp))
        opsets.drop_unused_domains(quantized)
        opsets.lower_ir_version(quantized)
        notes.extend(_unquantized_note(quantized, cfg))
        onnx.save_model(quantized, str(tmp))
        _smoke_run(tmp, calibration, input_names)
        replace_atomically(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    parent = read_manifest(src)
    parameters = int(parent["parameters"]) if parent and "parameters" in parent else count_parameters(float_model)
    source = dict(parent.get("source", {})) if parent else {}
    quant = cfg.to_json()
    quant["calibration"] = dict(calibration_source or {}) if cfg.mode == "static" else None
    trt_path = None
    if target == "jetson":
        trt_path = write_trt_options(out, quantized, fp16=True, int8=cfg.mode == "static")
        quant["tensorrt_options"] = trt_path.name
    manifest = build_manifest(
        out, precision=cfg.precision, parameters=parameters, model=quantized, source=source,
        parent={"file": src.name, "sha256": sha256_file(src), "size_bytes": src.stat().st_size},
        quantization=quant, **dict(extra_manifest or {}),
    )
    mpath = write_manifest(out, manifest)
    return QuantizeResult(out, mpath, manifest, cfg, trt_path, notes)


def _unquantized_note(model: Any, cfg: QuantConfig) -> list[str]:
    """Say so when ONNX Runtime left most weights in float (no int8 kernel for
    the operators that hold them, e.g. GRU under dynamic quantization)."""
    if cfg.mode == "fp16":
        return []
    import onnx

    floats = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    ints = sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    big_float = sum(n for n in floats.values() if n > 1)
    if big_float <= ints:
        return []
    holders = sorted({n.op_type for n in model.graph.node if any(i in floats and floats[i] > 1 for i in n.input)})
    return [f"most weights stayed float32 ({big_float:,} float vs {ints:,} int8 values): ONNX Runtime has no "
            f"{cfg.mode} int8 kernel for {', '.join(holders)}"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs per-tensor warnings through the root logger and
    prints progress; the command's own report says what matters."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _preprocess(src: Path, dst: Path, notes: list[str]) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst))
        return
    except Exception as exc:
        first = first_line(exc, 160)
        notes.append(f"symbolic shape inference failed ({first}); pre-processed with ONNX shape inference only")
    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime's quantization pre-processing failed on {src.name}: "
                          f"{first_line(exc)}") from None


def _untie_transposed_gemm_weights(path: Path) -> None:
    """Give each Gemm with ``transB=1`` whose weight another node also reads a
    copy of its own. Dynamic quantization turns such a Gemm into a MatMul by
    transposing its weight initializer; ONNX Runtime 1.23 (the newest for
    Python 3.10) does so in place, assuming no other node reads it, so a
    weight two Gemms share (a Transformer's identical layers, deduplicated by
    the exporter) was transposed twice, back to its old layout, and the
    quantized model silently computed something else. Newer releases
    transpose a copy; for them this only stores a shared weight twice."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    taken = set(inits) | {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or readers.get(node.input[1], 0) < 2:
            continue
        if node.input[1] not in inits or not any(a.name == "transB" and onnx.helper.get_attribute_value(a)
                                                 for a in node.attribute):
            continue
        name, i = node.input[1], 1
        while f"{name}_{i}" in taken:
            i += 1
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}_{i}"
        taken.add(copy.name)
        graph.initializer.append(copy)
        readers[name] -= 1
        node.input[1] = copy.name
    if len(graph.initializer) > len(inits):
        onnx.save_model(model, str(path))


class _Reader:
    """Feeds calibration rows to ORT in batches of ``CALIBRATION_BATCH``."""

    def __init__(self, arrays: Mapping[str, np.ndarray], names: Sequence[str], dtypes: Mapping[str, Any]) -> None:
        self.arrays = {n: np.asarray(arrays[n]) for n in names}
        self.dtypes = dtypes
        self.rows = len(next(iter(self.arrays.values())))
        self.pos = 0
        self.progress = Progress("calibrating", self.rows, unit="rows")

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.rows:
            self.progress.close()
            return None
        end = self.pos + CALIBRATION_BATCH
        batch = {n: np.ascontiguousarray(a[self.pos:end], dtype=self.dtypes[n]) for n, a in self.arrays.items()}
        self.progress.set(min(end, self.rows))
        self.pos = end
        return batch

    def rewind(self) -> None:
        self.pos = 0
        self.progress.close()
        self.progress = Progress("calibrating (again)", self.rows, unit="rows")


def _quantize_int8(src: Path, dst: Path, cfg: QuantConfig, calibration: Mapping[str, np.ndarray] | None,
                   input_names: Sequence[str], notes: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from fedge.onnxrt import ORT_TYPES, open_session

    qtypes = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    pre = temp_path_beside(dst, ".pre.onnx")
    try:
        _preprocess(src, pre, notes)
        if cfg.mode == "dynamic":
            _untie_transposed_gemm_weights(pre)
            with _quiet():
                quantize_dynamic(str(pre), str(dst), weight_type=qtypes[cfg.weight_type or "int8"],
                                 per_channel=cfg.per_channel, reduce_range=cfg.reduce_range)
            return
        assert calibration is not None
        rows: Mapping[str, np.ndarray] = calibration
        session = open_session(pre)
        dtypes = {i.name: ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
        del session

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.inner = _Reader(rows, input_names, dtypes)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return self.inner.get_next()

            def rewind(self) -> None:
                self.inner.rewind()

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": cfg.symmetric_activations}
        try:
            with _quiet():
                quantize_static(
                    str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                    reduce_range=cfg.reduce_range, activation_type=qtypes[cfg.activation_type or "int8"],
                    weight_type=qtypes[cfg.weight_type or "int8"], calibrate_method=methods[cfg.method or "minmax"],
                    extra_options=extra,
                )
        except ExportError:
            raise
        except Exception as exc:
            text = first_line(exc)
            raise ExportError(f"static quantization failed: {text}; check that the calibration arrays match the "
                              "model inputs, or try --mode dynamic") from None
    finally:
        pre.unlink(missing_ok=True)


def _smoke_run(path: Path, calibration: Mapping[str, np.ndarray] | None, input_names: Sequence[str]) -> None:
    """The quantized file must load and run in ONNX Runtime before it is kept."""
    from export.report import random_feeds
    from fedge.onnxrt import ORT_TYPES, open_session, runtime_message

    session = open_session(path)
    if calibration and all(n in calibration for n in input_names):
        feeds = {i.name: np.ascontiguousarray(np.asarray(calibration[i.name])[:4],
                                              dtype=ORT_TYPES.get(i.type, np.float32)) for i in session.get_inputs()}
    else:
        feeds = random_feeds(session, 2)
    try:
        outs = session.run(None, feeds)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the quantized model: {runtime_message(exc)}") from None
    if not all(np.all(np.isfinite(o)) for o in outs if np.asarray(o).dtype.kind == "f"):
        raise ExportError("the quantized model produces NaN/inf on calibration data; try --method percentile or "
                          "--mode dynamic")


def write_trt_options(model_path: str | Path, model: Any, *, fp16: bool = True, int8: bool = True,
                      max_batch: int = 64, opt_batch: int = 1) -> Path:
    """TensorRT execution-provider options for ONNX Runtime on a Jetson.

    Option names are ORT's (``trt_int8_enable``, ``trt_fp16_enable``,
    ``trt_engine_cache_enable``, ``trt_engine_cache_path``, ``trt_timing_cache_*``,
    ``trt_profile_{min,opt,max}_shapes``). The shape profile covers batch 1
    to ``max_batch`` so TensorRT builds one engine instead of rebuilding
    whenever the batch size changes. The engine cache path is relative to
    the model's folder; engines are specific to the device, TensorRT and ORT
    versions, so they are built on the device on first load, never shipped.
    """
    p = Path(model_path)
    stem = p.stem
    init_names = {t.name for t in model.graph.initializer}
    mins, opts, maxs = [], [], []
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        rest = "x".join(str(d or 1) for d in dims[1:])

        def shape(b: int, rest: str = rest) -> str:
            return f"{b}x{rest}" if rest else str(b)

        mins.append(f"{vi.name}:{shape(1)}")
        opts.append(f"{vi.name}:{shape(opt_batch)}")
        maxs.append(f"{vi.name}:{shape(max_batch)}")
    options = {
        "trt_int8_enable": int8,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": f"trt_cache/{stem}",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": "trt_cache",
        "trt_max_workspace_size": 1 << 30,
        "trt_builder_optimization_level": 3,
        "trt_profile_min_shapes": ",".join(mins),
        "trt_profile_opt_shapes": ",".join(opts),
        "trt_profile_max_shapes": ",".join(maxs),
    }
    doc = {
        "model": p.name,
        "model_sha256": sha256_file(p),
        "providers": [["TensorrtExecutionProvider", options], ["CUDAExecutionProvider", {}],
                      ["CPUExecutionProvider", {}]],
        "usage": "ort.InferenceSession(model, providers=[tuple(p) for p in doc['providers']]); the cache paths are "
                 "relative to the model's folder: make them absolute (and create them) before creating the session",
        "notes": ["QDQ model: TensorRT uses the Q/DQ scales (explicit quantization); no calibration table is needed "
                  "or allowed", "engines are device-specific: delete trt_cache/ after changing the model, TensorRT, "
                  "ONNX Runtime or the device"],
    }
    return write_json(trt_options_path(p), doc)
