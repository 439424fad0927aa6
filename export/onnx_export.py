"""PyTorch -> ONNX: export one model to one self-contained file and prove
that ONNX Runtime computes what PyTorch computes.

Owns the call to ``torch.onnx.export`` and everything around it:

- The exporter is the current one, ``dynamo=True`` (``torch.export``
  capture, ONNX Script translation, ``optimize=True`` constant folding and
  cleanup). ``legacy_exporter=True`` selects the TorchScript exporter
  (``dynamo=False``) for models ``torch.export`` cannot capture.
- The batch dimension is dynamic: ``dynamic_shapes`` with a
  ``torch.export.Dim`` per input (``dynamic_axes`` for the legacy
  exporter). The example batch is 2, never 1, because ``torch.export``
  specialises dimensions of size 0 and 1 to constants; after export each
  input's first dimension is checked to really be symbolic.
- Weights are stored inside the file (``external_data=False``): a device
  receives one file whose sha256 is in the manifest. Graphs of 2 GB or more
  cannot be one protobuf and are refused.
- The opset is explicit (see ``export.opsets`` for the default of 17).
- After export the file is run in ONNX Runtime at batch sizes 1, 3 and 64
  against ``model.eval()`` in PyTorch; a difference beyond
  ``atol + rtol * |reference|`` fails the export with a per-output report,
  and the file is not left at the output path.

PyTorch is imported inside functions so that importing this module stays
cheap; the device-side runtime never imports it at all.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export import opsets
from export.errors import ExportError, QualityError
from export.files import check_outputs, replace_atomically, temp_path_beside
from export.manifest import build_manifest, manifest_path, write_manifest
from export.signature import BATCH_DIM, InputSpec, dynamic_sizes, examples
from fedge.errors import first_line
from fedge.onnxrt import open_session

if TYPE_CHECKING:
    from torch import nn

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
VERIFY_BATCHES = (1, 3, 64)
EXAMPLE_BATCH = 2
MAX_PROTO_BYTES = 2**31 - 1


@dataclass(frozen=True)
class ParityRow:
    batch: int
    output: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs PyTorch, per batch size and output."""

    atol: float
    rtol: float
    rows: tuple[ParityRow, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self) -> str:
        lines = [f"parity with PyTorch (pass if |onnx - torch| <= {self.atol:g} + {self.rtol:g} * |torch|):",
                 f"  {'batch':>5}  {'output':<16} {'max abs diff':>12}  {'max rel diff':>12}  result"]
        for r in self.rows:
            verdict = "ok" if r.ok else "FAIL"
            lines.append(f"  {r.batch:>5}  {r.output:<16} {r.max_abs:>12.3e}  {r.max_rel:>12.3e}  {verdict}"
                         + (f" ({r.note})" if r.note else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "batches": sorted({r.batch for r in self.rows}),
                "passed": self.ok, "notes": list(self.notes),
                "outputs": [{"batch": r.batch, "output": r.output, "max_abs_diff": r.max_abs,
                             "max_rel_diff": r.max_rel, "ok": r.ok} for r in self.rows]}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    parity: ParityReport
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    @property
    def size_bytes(self) -> int:
        return int(self.manifest["size_bytes"])

    @property
    def opset(self) -> int:
        return int(self.manifest["opset"])


def export_model(model: nn.Module, inputs: Sequence[InputSpec], out_path: str | Path, *,
                 opset: int = opsets.DEFAULT_OPSET, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 source: Mapping[str, Any] | None = None, output_names: Sequence[str] | None = None,
                 legacy_exporter: bool = False, force: bool = False,
                 verify_batches: Sequence[int] = VERIFY_BATCHES) -> ExportResult:
    """Export ``model`` to ``out_path``, verify it, and write its manifest.

    Raises ``ExportError`` for a user mistake (signature that does not fit,
    unsupported operator, existing output) and ``QualityError`` when ONNX
    Runtime disagrees with PyTorch beyond tolerance.
    """
    out = Path(out_path)
    opsets.check_opset(opset)
    if not inputs:
        raise ExportError("the model needs at least one input spec, e.g. x:1x64:float32")
    check_outputs([out, manifest_path(out)], force)
    model.eval()
    args = _torch_args(inputs, EXAMPLE_BATCH)
    reference = _run_torch(model, args, inputs)
    names = _output_names(output_names, len(reference))

    proto = _export_proto(model, args, inputs, names, opset, legacy_exporter)
    _check_dynamic_dims(proto, inputs)
    if opsets.default_domain_opset(proto) != opset:
        proto = opsets.convert_opset(proto, opset)
    opsets.lower_ir_version(proto)
    _strip_debug_metadata(proto)
    size = proto.ByteSize()
    if size >= MAX_PROTO_BYTES:
        raise ExportError(f"the model is {size / 2**30:.1f} GB; one ONNX file holds less than 2 GB, which is also far "
                          "beyond what an edge device runs - shrink the model")

    tmp = temp_path_beside(out, ".onnx")
    try:
        _save(proto, tmp)
        parity = verify_parity(model, tmp, inputs, batches=verify_batches, atol=atol, rtol=rtol,
                               ranges=integer_input_ranges(proto))
        if not parity.ok:
            worst = max((r for r in parity.rows if not r.ok), key=lambda r: r.max_abs)
            advice = ("the TorchScript exporter traces one run of forward(), so data-dependent control flow (an "
                      "if on tensor values, a loop over a tensor's contents) keeps the branch the example took: "
                      "make forward() free of it, or use the default exporter" if legacy_exporter else
                      "raise --atol/--rtol if this is expected float noise, or try --legacy-exporter")
            raise QualityError(
                f"ONNX Runtime disagrees with PyTorch (output {worst.output!r}, batch {worst.batch}: max abs diff "
                f"{worst.max_abs:.3e}); {out.name} was not written - {advice}",
                parity.table())
        replace_atomically(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    n_params = sum(int(p.numel()) for p in model.parameters())
    manifest = build_manifest(
        out, precision="float32", parameters=n_params, model=proto,
        source=dict(source or {}),
        export={"exporter": "torch.onnx.export(dynamo=False)" if legacy_exporter else "torch.onnx.export(dynamo=True)",
                "opset_requested": opset,
                "dynamic_axes": {s.name: {str(i): n for i, n in enumerate(s.dim_names) if n} for s in inputs}},
        verification=parity.to_json(),
    )
    mpath = write_manifest(out, manifest)
    return ExportResult(path=out, manifest_path=mpath, manifest=manifest, parity=parity)


def export_from_factory(factory: str | None, inputs: Sequence[InputSpec], out_path: str | Path, *,
                        factory_args: Mapping[str, Any] | None = None, weights: str | Path | None = None,
                        **options: Any) -> ExportResult:
    """Build the model from its import path (and weights file), then ``export_model``."""
    from export.sources import load_model

    model, src = load_model(factory, factory_args, weights)
    return export_model(model, inputs, out_path, source=src.to_json(), **options)


def export_global_model(message: bytes, inputs: Sequence[InputSpec], out_path: str | Path,
                        **options: Any) -> ExportResult:
    """Export the model carried by a fedge global-model message (what the
    aggregator publishes each round); the manifest records its round."""
    from export.files import sha256_bytes
    from export.sources import model_from_global

    model, src = model_from_global(message)
    source = src.to_json()
    source["weights"] = {"file": None, "sha256": sha256_bytes(message), "format": "fedge_model"}
    return export_model(model, inputs, out_path, source=source, **options)


def verify_parity(model: nn.Module, onnx_path: str | Path, inputs: Sequence[InputSpec], *,
                  batches: Sequence[int] = VERIFY_BATCHES, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  seed: int = 0, ranges: Mapping[str, tuple[int, int]] | None = None) -> ParityReport:
    """Run the ONNX file and ``model.eval()`` on the same random batches.

    Named dynamic dimensions change size from batch to batch (the example's,
    one more, one less); integer inputs are drawn from their declared range,
    else from ``ranges`` (what ``integer_input_ranges`` found in the graph),
    else from {0, 1}, which the report then says."""
    import torch

    model.eval()
    session = open_session(onnx_path)
    out_names = [o.name for o in session.get_outputs()]
    rows: list[ParityRow] = []
    ranges = dict(ranges or {})
    notes = tuple(f"integer input {s.name!r} was checked on the values 0 and 1 only (no embedding table in the "
                  f"graph bounds it): give its range as {s.name}:...:{s.dtype}:LOW..HIGH"
                  for s in inputs if s.np_dtype.kind in "iu" and s.value_range is None and s.name not in ranges)
    base = dynamic_sizes(inputs)
    for i, batch in enumerate(batches):
        sizes = {n: max(2, d + (0, 1, -1)[i % 3]) for n, d in base.items()}
        feeds = examples(inputs, batch, seed=seed + batch, sizes=sizes, ranges=ranges)
        with torch.no_grad():
            ref = _flatten(model(*[torch.from_numpy(feeds[s.name]) for s in inputs]))
        got = session.run(None, feeds)
        for name, r_t, g in zip(out_names, ref, got, strict=False):
            r = r_t.detach().cpu().numpy()
            rows.append(_compare(batch, name, r, np.asarray(g), atol, rtol))
        if len(ref) != len(got):
            rows.append(ParityRow(batch, "(outputs)", float("inf"), float("inf"), False,
                                  f"PyTorch gave {len(ref)} outputs, ONNX {len(got)}"))
    return ParityReport(atol=atol, rtol=rtol, rows=tuple(rows), notes=notes)


# Operators an integer input passes through unchanged on its way to an embedding lookup.
_INDEX_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand"}


def integer_input_ranges(proto: Any) -> dict[str, tuple[int, int]]:
    """For each integer graph input that indexes an embedding table (a Gather
    on a constant, reached directly or through reshapes and casts): the
    indices the smallest such table accepts, 0..rows-1."""
    from onnx import TensorProto

    tables = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    integer = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}
    ranges = {}
    for vi in proto.graph.input:
        if vi.type.tensor_type.elem_type not in integer:
            continue
        rows: list[int] = []
        frontier, seen = [vi.name], set()
        while frontier:
            value = frontier.pop()
            if value in seen:
                continue
            seen.add(value)
            for node in consumers.get(value, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value and \
                        node.input[0] in tables:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = tables[node.input[0]]
                    if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                        rows.append(int(dims[axis]))
                elif node.op_type in _INDEX_PASSTHROUGH and node.input and node.input[0] == value:
                    frontier.extend(node.output)
        if rows:
            ranges[vi.name] = (0, min(rows) - 1)
    return ranges


def _compare(batch: int, name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> ParityRow:
    if ref.shape != got.shape:
        return ParityRow(batch, name, float("inf"), float("inf"), False, f"shape {got.shape} vs PyTorch {ref.shape}")
    if ref.size == 0:
        return ParityRow(batch, name, 0.0, 0.0, True)
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    diff = np.abs(g - r)
    both_nan = np.isnan(r) & np.isnan(g)
    diff = np.where(both_nan, 0.0, diff)
    max_abs = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))
    rel = diff / np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    max_rel = float(np.max(np.where(np.isnan(rel), np.inf, rel)))
    ok = bool(np.all(np.isclose(g, r, atol=atol, rtol=rtol, equal_nan=True)))
    return ParityRow(batch, name, max_abs, max_rel, ok)


# --- torch side -------------------------------------------------------------------


def _torch_args(inputs: Sequence[InputSpec], batch: int) -> tuple[Any, ...]:
    import torch

    feeds = examples(inputs, batch, seed=1234)
    return tuple(torch.from_numpy(feeds[s.name]) for s in inputs)


def _flatten(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    if isinstance(out, Mapping):
        return [t for item in out.values() for t in _flatten(item)]
    raise ExportError(f"the model returned {type(out).__name__}; forward() must return tensors "
                      "(a tensor, or a tuple/list/dict of tensors)")


def _run_torch(model: nn.Module, args: tuple[Any, ...], inputs: Sequence[InputSpec]) -> list[Any]:
    import torch

    sig = " ".join(str(s) for s in inputs)
    try:
        with torch.no_grad():
            return _flatten(model(*args))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"the input signature {sig} does not fit the model: {first_line(exc)}; give --input with "
                          "the shape forward() expects, batch first (e.g. x:1x64:float32)") from None


def _output_names(given: Sequence[str] | None, count: int) -> list[str]:
    if given:
        if len(given) != count:
            raise ExportError(f"--output-name was given {len(given)} times but the model returns {count} outputs")
        return list(given)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence the exporter's progress prints, warnings and torch's own log
    records (a failed capture logs whole tracebacks at ERROR level); what
    matters is turned into one ``ExportError`` line instead."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """The TorchScript exporter prints graphs from C++ straight to file
    descriptors 1 and 2, past ``sys.stdout``; park them in a temp file for
    the call. (Process-wide: only used around the legacy exporter.)"""
    import os
    import sys
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _export_proto(model: nn.Module, args: tuple[Any, ...], inputs: Sequence[InputSpec], output_names: list[str],
                  opset: int, legacy: bool) -> Any:
    import onnx
    import torch

    in_names = [s.name for s in inputs]
    if legacy:
        axes: dict[str, dict[int, str]] = {s.name: {i: n for i, n in enumerate(s.dim_names) if n} for s in inputs}
        axes.update({n: {0: BATCH_DIM} for n in output_names})
        tmp = Path(tempfile.mkdtemp(prefix="fedge-export-"))
        try:
            with _quiet(), _quiet_fds():
                torch.onnx.export(model, args, str(tmp / "legacy.onnx"), dynamo=False, opset_version=opset,
                                  input_names=in_names, output_names=output_names, dynamic_axes=axes,
                                  do_constant_folding=True)
            return onnx.load(str(tmp / "legacy.onnx"))
        except Exception as exc:
            raise ExportError(_explain_failure(exc, legacy=True)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    dims = {name: torch.export.Dim(name, min=1) for s in inputs for name in s.dim_names if name}
    dynamic_shapes = tuple({i: dims[n] for i, n in enumerate(s.dim_names) if n} for s in inputs)
    try:
        with _quiet():
            program = torch.onnx.export(
                model, args, None, dynamo=True, opset_version=max(opset, opsets.EXPORTER_MIN_OPSET),
                input_names=in_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                external_data=False, optimize=True, verbose=False, report=False,
            )
            assert program is not None  # f=None with dynamo=True returns the program
            return program.model_proto
    except Exception as exc:
        raise ExportError(_explain_failure(exc, legacy=False)) from None


def _check_dynamic_dims(proto: Any, inputs: Sequence[InputSpec]) -> None:
    """Every dimension the signature calls dynamic must be symbolic in the
    graph; it is then named as the signature names it (``batch``, ``seq``).
    An output dimension is renamed only when it is one of those symbols: a
    data-dependent size (the number of detections, say) keeps its own."""
    graph_inputs = {vi.name: vi for vi in proto.graph.input}
    renamed: dict[str, str] = {}
    for spec in inputs:
        vi = graph_inputs.get(spec.name)
        if vi is None:
            raise ExportError(f"input {spec.name!r} does not reach the exported graph (forward() ignores it); "
                              "drop it from --input")
        dims = vi.type.tensor_type.shape.dim
        for axis, name in enumerate(spec.dim_names):
            if not name or axis >= len(dims):
                continue
            if not dims[axis].dim_param:
                if axis == 0:
                    raise ExportError(
                        f"the model pins the batch size of input {spec.name!r} to {dims[0].dim_value}: forward() "
                        "uses a fixed batch (e.g. x.view(2, -1)); write x.flatten(1) or x.view(x.shape[0], -1) so "
                        "any batch works")
                raise ExportError(
                    f"the model pins dimension {axis} ({name!r}) of input {spec.name!r} to {dims[axis].dim_value}: "
                    "forward() fixes that size (a reshape to a constant, a fixed-size parameter); make it follow "
                    f"the input, or drop '{name}=' from --input to export a fixed size")
            renamed[dims[axis].dim_param] = name
            dims[axis].dim_param = name
    for vi in [*proto.graph.output, *proto.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in renamed:
                dim.dim_param = renamed[dim.dim_param]


def _strip_debug_metadata(proto: Any) -> None:
    """Drop per-node and per-value exporter metadata (stack traces with the
    exporting machine's file paths): it changes from machine to machine and
    a device has no use for it."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del vi.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]


def _save(proto: Any, path: Path) -> None:
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=False)


_OP_PATTERNS = (
    re.compile(r"op='([^']+)', overload='([^']+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"No ONNX function found for ([\w.:]+)"),
    re.compile(r"Exporting the operator '?([\w:.]+)'? to ONNX"),
    re.compile(r"operator with unrecognized namespace ([\w:.]+)"),
)


def _explain_failure(exc: BaseException, legacy: bool) -> str:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain)
    op = None
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            op = m.group(1) if pattern.groups == 1 else f"{m.group(1)}.{m.group(2)}"
            break
    inner = first_line(chain[-1])
    if legacy:
        what = f"operator {op}" if op else "the model"
        return (f"the legacy ONNX exporter cannot export {what}: {inner}; try the default exporter (drop "
                "--legacy-exporter), a higher --opset, or replace that operation in forward()")
    step1 = type(exc).__name__ == "TorchExportError" or "torch.export" in str(exc).split("\n", 1)[0]
    if op and not step1:
        return (f"the ONNX exporter has no translation for operator {op} ({inner}); try --legacy-exporter "
                "(TorchScript exporter, dynamo=False), a higher --opset such as 18, or replace that operation in "
                "forward()")
    return (f"torch.export cannot capture the model: {inner}; try --legacy-exporter (TorchScript exporter, "
            "dynamo=False), or remove data-dependent Python control flow from forward()")


