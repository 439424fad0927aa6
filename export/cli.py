"""The export toolchain's subcommands of ``fedge``.

``add_commands(subparsers)`` adds ``export``, ``quantize``, ``inspect``,
``bench-model`` and ``predict`` to the ``fedge`` parser; ``python -m
export.cli ...`` runs them on their own. Each command's function handles
its own failures: a user mistake (``ExportError`` or another ``FedgeError``:
bad import path, bad signature, missing file) prints ``fedge <cmd>: error: <one line>`` to stderr and returns 2; a
result that misses a quality bar (``QualityError``: ONNX disagrees with
PyTorch, the quantized model lost too much accuracy) prints its report and
``fedge <cmd>: failed: <one line>`` and returns 1. No traceback either way.

Nothing at module level imports PyTorch, ONNX or ONNX Runtime: each command
imports what it needs when it runs, so ``fedge predict`` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from export.errors import ExportError, QualityError

Command = Callable[[argparse.Namespace], int]


def _guarded(name: str, fn: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        from fedge.errors import FedgeError

        try:
            return int(fn(args) or 0)
        except QualityError as exc:
            if exc.report:
                print(exc.report)
            print(f"fedge {name}: failed: {exc}", file=sys.stderr)
            return 1
        except (FedgeError, FileNotFoundError) as exc:  # ExportError, a bad import path or ONNX file, a signature
            print(f"fedge {name}: error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = f"cmd_{name.replace('-', '_')}"
    return run


def _json_arg(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ExportError(f"{flag} must be a JSON object, e.g. '{{\"hidden\": 64}}': {exc}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{flag} must be a JSON object, e.g. '{{\"hidden\": 64}}'")
    return value


def _write_json(path: str | None, data: Any) -> None:
    if path:
        from export.files import write_json

        write_json(path, data)


# --- export -------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_from_factory
    from export.signature import parse_input_specs

    specs = parse_input_specs(args.input)
    result = export_from_factory(
        args.model, specs, args.out, factory_args=_json_arg(args.model_args, "--model-args"), weights=args.weights,
        opset=args.opset, atol=args.atol, rtol=args.rtol, output_names=args.output_name or None,
        legacy_exporter=args.legacy_exporter, force=args.force,
    )
    m = result.manifest
    print(f"wrote {result.path} ({m['size_bytes'] / 1024:.1f} kB, opset {m['opset']}, IR {m['ir_version']}, "
          f"{m['parameters']:,} parameters, sha256 {m['sha256'][:16]}...)")
    print(result.parity.table())
    print(f"manifest {result.manifest_path}")
    return 0


# --- quantize -----------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    from export.data import check_fits, load_dataset
    from export.manifest import record_evaluation, tool_versions
    from export.quantize import quantize_model, resolve_config
    from export.report import compare_models
    from export.target import evaluation_for
    from fedge.onnxrt import OnnxPredictor

    config = resolve_config(args.mode, args.target, method=args.method, per_channel=args.per_channel, vnni=args.vnni)
    if args.max_accuracy_drop is not None and not (0 <= args.max_accuracy_drop < float("inf")):
        raise ExportError(f"--max-accuracy-drop {args.max_accuracy_drop:g} must be a number of points >= 0, e.g. 1")
    if args.max_accuracy_drop is not None and not args.eval:
        raise ExportError("--max-accuracy-drop needs an evaluation set with labels: give --eval FILE.npz or a data "
                          "spec such as fedge.datasets:digits")
    evaluation = evaluation_for(config.target, config.precision, full_range_weights=not config.reduce_range,
                                vnni=config.vnni)
    if args.max_accuracy_drop is not None and not evaluation.target_faithful:
        raise ExportError(f"--max-accuracy-drop needs the target's int8 arithmetic, which ONNX Runtime "
                          f"{tool_versions().get('onnxruntime')} cannot compute on this host "
                          f"({evaluation.host.describe()}); run the gate on an arm64 machine or an x86 CPU with VNNI")
    signature = OnnxPredictor(args.model).inputs
    input_names = [name for name, _, _ in signature]
    calibration = None
    if args.mode == "static":
        if not args.calibration:
            raise ExportError("--mode static needs --calibration FILE.npz or a data spec such as fedge.datasets:digits "
                              "(or use --mode dynamic)")
        calibration = load_dataset(args.calibration, input_names, args=_json_arg(args.calibration_args,
                                   "--calibration-args"), split="train", limit=args.calibration_size,
                                   what="calibration")
        check_fits(calibration, signature, "calibration")
    eval_set = None
    if args.eval:
        eval_set = load_dataset(args.eval, input_names, args=_json_arg(args.eval_args, "--eval-args"), split="test",
                                limit=args.eval_size, what="evaluation")
        check_fits(eval_set, signature, "evaluation")
        if args.max_accuracy_drop is not None and eval_set.labels is None:
            raise ExportError("--max-accuracy-drop needs labels in the evaluation set (an array named 'labels' or "
                              "'y' in the .npz, or a data spec returning (x, y))")
    result = quantize_model(
        args.model, args.out, mode=args.mode, calibration=calibration.inputs if calibration else None,
        method=args.method, per_channel=args.per_channel, target=args.target, vnni=args.vnni, force=args.force,
        calibration_source=calibration.source if calibration else None,
    )
    label = f"{result.config.precision} ({args.mode}, {args.target})"
    cmp = compare_models(args.model, result.path, eval_set=eval_set, labels=("float32", label),
                         threads=args.threads or None, latency_batch=args.latency_batch, runs=args.runs,
                         latency=not args.no_latency, evaluation=evaluation)
    cmp.notes[:0] = result.notes
    record_evaluation(result.path, cmp.to_json())
    print(f"wrote {result.path}  (manifest {result.manifest_path.name}"
          + (f", TensorRT options {result.trt_options_path.name}" if result.trt_options_path else "") + ")")
    print(cmp.table())
    report = {"model": str(args.model), "quantized": str(result.path), "config": result.config.to_json(),
              **cmp.to_json(), "max_accuracy_drop": args.max_accuracy_drop, "passed": True}
    failed = (args.max_accuracy_drop is not None and cmp.accuracy_drop_points is not None
              and cmp.accuracy_drop_points > args.max_accuracy_drop)
    report["passed"] = not failed
    _write_json(args.json, report)
    if failed:
        raise QualityError(f"the quantized model loses {cmp.accuracy_drop_points:.2f} accuracy points, more than "
                           f"--max-accuracy-drop {args.max_accuracy_drop:g}; try --method entropy or percentile, "
                           "--per-channel, more calibration data, or --mode dynamic/fp16")
    return 0


# --- inspect, bench-model, predict ---------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from export.inspection import format_summary, inspect_model

    info = inspect_model(args.model)
    print(format_summary(info))
    _write_json(args.json, info)
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from export.report import bench_models
    from fedge.onnxrt import default_threads, open_session

    for p in args.models:
        open_session(p)
    batches = args.batch or [1]
    threads = args.threads or [default_threads()]
    if min(batches) < 1 or min(threads) < 1:
        raise ExportError("--batch and --threads must be at least 1")
    rows = bench_models(args.models, batches=batches, threads=threads, runs=args.runs, warmup=args.warmup)
    # stdout holds one thing: the JSON with --json -, else the table.
    table = sys.stderr if args.json == "-" else sys.stdout
    print(f"{'model':<40} {'batch':>5} {'threads':>7} {'p50 ms':>9} {'p90 ms':>9}", file=table)
    for r in rows:
        print(f"{Path(r['model']).name:<40} {r['batch']:>5} {r['threads']:>7} {r['p50_ms']:>9.3f} "
              f"{r['p90_ms']:>9.3f}", file=table)
    doc = {"graph_optimization": "ORT_ENABLE_ALL", "runs": max(args.runs, 50), "warmup": args.warmup, "results": rows}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        _write_json(args.json, doc)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from export.data import load_dataset
    from fedge.onnxrt import OnnxPredictor, softmax

    predictor = OnnxPredictor(args.model, threads=args.threads or None)
    data = load_dataset(args.input, predictor.input_names, what="input")
    logits = predictor.predict(data.inputs)
    result: dict[str, np.ndarray] = {"outputs": logits}
    if logits.ndim == 2 and logits.shape[1] >= 2:
        probs = softmax(logits.astype(np.float64)).astype(np.float32)
        preds = probs.argmax(axis=1)
        result.update(predictions=preds, probabilities=probs)
        shown = min(len(preds), args.show)
        for i in range(shown):
            print(f"{i}\t{int(preds[i])}\t{float(probs[i, preds[i]]):.4f}")
        if shown < len(preds):
            print(f"... {len(preds) - shown} more rows")
        counts = np.bincount(preds, minlength=probs.shape[1])
        print(f"{len(preds)} rows; predicted class counts: " + " ".join(f"{c}:{n}" for c, n in enumerate(counts)))
        if data.labels is not None:
            acc = float(np.mean(preds == data.labels.reshape(-1)))
            print(f"accuracy against the labels in {Path(args.input).name}: {acc * 100:.2f}%")
    else:
        print(f"{len(logits)} rows; output shape {logits.shape}")
    if args.output:
        from export.files import check_outputs

        check_outputs([args.output], args.force)
        np.savez(args.output, **result)  # type: ignore[arg-type]
        print(f"wrote {args.output}")
    return 0


# --- parser --------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Add the export toolchain's subcommands to ``fedge``'s subparsers."""
    e = sub.add_parser("export", help="export a PyTorch model to ONNX and verify it against PyTorch")
    e.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="model factory import path (optional when --weights is a fedge model message)")
    e.add_argument("--model-args", default="{}", metavar="JSON", help="factory keyword arguments as a JSON object")
    e.add_argument("--weights", default=None, metavar="FILE",
                   help="state dict (torch.save), .safetensors, or a fedge global-model message")
    e.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE[:LOW..HIGH]]", required=True,
                   help="a model input, batch first, e.g. x:1x64:float32, or tokens:1x32:int64:0..9999 for the "
                   "values an integer input may take (repeat for several; batch is dynamic)")
    e.add_argument("--output-name", action="append", default=[], metavar="NAME", help="name the outputs in order")
    e.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    e.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (default 17: ONNX Runtime >= 1.14 and TensorRT 8.6/10 read it)")
    e.add_argument("--atol", type=float, default=1e-4, help="parity tolerance, absolute (default 1e-4)")
    e.add_argument("--rtol", type=float, default=1e-3, help="parity tolerance, relative (default 1e-3)")
    e.add_argument("--legacy-exporter", action="store_true",
                   help="use the TorchScript exporter (dynamo=False) for models torch.export cannot capture")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.set_defaults(func=_guarded("export", cmd_export), default_level="WARNING")

    q = sub.add_parser("quantize", help="quantize an ONNX model (int8 static/dynamic, fp16) and compare it")
    q.add_argument("--model", required=True, metavar="FLOAT.onnx", help="the float32 ONNX model to quantize")
    q.add_argument("--out", required=True, metavar="FILE.onnx", help="the quantized ONNX file to write")
    q.add_argument("--mode", default="static", choices=["static", "dynamic", "fp16"],
                   help="static QDQ int8 (default; conv/MLP), dynamic int8 (RNN/Transformer), or fp16")
    q.add_argument("--calibration", default=None, metavar="FILE.npz|MODULE:CALLABLE",
                   help="calibration data: .npz named after the inputs, or a data spec (split='train')")
    q.add_argument("--calibration-args", default="{}", metavar="JSON",
                   help="keyword arguments for a module:callable --calibration, as a JSON object")
    q.add_argument("--calibration-size", type=int, default=512, help="calibration rows to use (default 512)")
    q.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="calibration method (default minmax)")
    # The help is set after: Python 3.10's BooleanOptionalAction appends " (default: %(default)s)" to one given.
    q.add_argument("--per-channel", action=argparse.BooleanOptionalAction,
                   default=True).help = "per-channel weight scales (default on)"
    q.add_argument("--target", default="arm64", choices=["arm64", "x86", "jetson"],
                   help="arm64: S8S8; x86: U8S8 (reduce_range unless --vnni); jetson: symmetric S8S8 + TensorRT "
                        "options file")
    q.add_argument("--vnni", action=argparse.BooleanOptionalAction, default=None,
                   help="x86 only: the CPU has VNNI (keeps the full 8-bit weight range)")
    q.add_argument("--eval", default=None, metavar="FILE.npz|MODULE:CALLABLE",
                   help="evaluation set with labels: .npz (inputs + 'labels'), or a data spec (split='test')")
    q.add_argument("--eval-args", default="{}", metavar="JSON",
                   help="keyword arguments for a module:callable --eval, as a JSON object")
    q.add_argument("--eval-size", type=int, default=0, help="evaluation rows to use (default all)")
    q.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="fail (exit 1) if accuracy drops by more than this many percentage points")
    q.add_argument("--threads", type=int, default=0, help="intra-op threads for latency (default: all cores)")
    q.add_argument("--latency-batch", type=int, default=1, help="batch size for latency (default 1)")
    q.add_argument("--runs", type=int, default=100, help="timed runs per model (at least 50)")
    q.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    q.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    q.add_argument("--force", action="store_true", help="overwrite existing output files")
    q.set_defaults(func=_guarded("quantize", cmd_quantize), default_level="WARNING")

    i = sub.add_parser("inspect", help="summarise an ONNX file and check it against its manifest")
    i.add_argument("model", metavar="FILE.onnx", help="the ONNX model to summarise")
    i.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    i.set_defaults(func=_guarded("inspect", cmd_inspect), default_level="WARNING")

    b = sub.add_parser("bench-model", help="latency (p50/p90) of ONNX files at given batch sizes and threads")
    b.add_argument("models", nargs="+", metavar="FILE.onnx", help="the ONNX models to time")
    b.add_argument("--batch", type=int, action="append", default=[], help="batch size (repeat; default 1)")
    b.add_argument("--threads", type=int, action="append", default=[], help="intra-op threads (repeat; default all)")
    b.add_argument("--runs", type=int, default=100, help="timed runs (at least 50)")
    b.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    b.add_argument("--json", default=None, metavar="FILE",
                   help="also write the results as JSON to FILE; '-' writes the JSON to stdout and the table to "
                        "stderr (fedge bench-model m.onnx --json - | jq). Without it, stdout is the table")
    b.set_defaults(func=_guarded("bench-model", cmd_bench_model), default_level="WARNING")

    p = sub.add_parser("predict", help="run an ONNX model on inputs from an .npz (ONNX Runtime only, no PyTorch)")
    p.add_argument("--model", required=True, metavar="FILE.onnx", help="the ONNX model to run")
    p.add_argument("--input", required=True, metavar="FILE.npz", help="arrays named after the model inputs")
    p.add_argument("--output", default=None, metavar="FILE.npz",
                   help="save outputs, predictions (argmax) and probabilities")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all cores)")
    p.add_argument("--show", type=int, default=20, help="rows to print (default 20)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.set_defaults(func=_guarded("predict", cmd_predict), default_level="WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge", description="fedge export toolchain")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
