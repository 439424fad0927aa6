"""How two ONNX files compare: accuracy, top-1 agreement, size and latency.

Owns the measurements behind ``fedge quantize``'s report and ``fedge
bench-model``. Outputs come from ``fedge.onnxrt`` sessions, whose int8
products are exact on every CPU (``export.target`` says how, and what that
means for the target). Classifier outputs are compared by accuracy and top-1
agreement, every output by max |difference|, mean squared error and
signal-to-noise ratio. Latency is measured the way a device runs the model: ONNX
Runtime with ``ORT_ENABLE_ALL`` (which fuses QuantizeLinear/DequantizeLinear
pairs into integer kernels), a stated intra-op thread count, warm-up runs
first, then at least 50 timed runs reported as p50/p90. When two models are
compared their runs are interleaved in blocks, so that a CPU clock change
during the measurement hits both alike. No PyTorch here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.data import Dataset
from export.target import Evaluation, target_outputs
from fedge.onnxrt import ORT_TYPES, OnnxPredictor, default_threads, open_session
from fedge.progress import Progress

MIN_RUNS = 50


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    batch: int
    threads: int

    def to_json(self) -> dict[str, Any]:
        return {"p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4), "mean_ms": round(self.mean_ms, 4),
                "runs": self.runs, "batch": self.batch, "threads": self.threads,
                "graph_optimization": "ORT_ENABLE_ALL"}


def random_feeds(session: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a session from its declared signature (symbolic dims = batch)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if i == 0 or not isinstance(d, int) else d for i, d in enumerate(inp.shape)]
        dtype = ORT_TYPES.get(inp.type, np.float32)
        if np.dtype(dtype).kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def measure_latency(paths: Sequence[str | Path], *, batch: int = 1, threads: int | None = None,
                    runs: int = 100, warmup: int = 10, feeds: Mapping[str, np.ndarray] | None = None,
                    block: int = 10) -> list[Latency]:
    """p50/p90 per model, runs interleaved in blocks of ``block``."""
    threads = int(threads or default_threads())
    runs = max(runs, MIN_RUNS)
    sessions = [open_session(p, threads) for p in paths]
    inputs = []
    for s in sessions:
        if feeds is None:
            inputs.append(random_feeds(s, batch))
        else:
            casted = {}
            for inp in s.get_inputs():
                casted[inp.name] = np.ascontiguousarray(feeds[inp.name][:batch], dtype=ORT_TYPES.get(inp.type,
                                                                                                   np.float32))
            inputs.append(casted)
    for s, f in zip(sessions, inputs, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    samples: list[list[float]] = [[] for _ in sessions]
    while len(samples[0]) < runs:
        for i, (s, f) in enumerate(zip(sessions, inputs, strict=True)):
            for _ in range(min(block, runs - len(samples[i]))):
                t0 = time.perf_counter()
                s.run(None, f)
                samples[i].append((time.perf_counter() - t0) * 1e3)
    out = []
    for times in samples:
        arr = np.asarray(times)
        out.append(Latency(float(np.percentile(arr, 50)), float(np.percentile(arr, 90)), float(arr.mean()), len(arr),
                           batch, threads))
    return out


def _predictions(logits: np.ndarray) -> np.ndarray | None:
    """Top-1 class per row for classifier outputs (n, classes) or (n, 1) logits."""
    if logits.ndim == 2 and logits.shape[1] >= 2:
        return logits.argmax(axis=1)
    if (logits.ndim == 2 and logits.shape[1] == 1) or logits.ndim == 1:
        return (logits.reshape(-1) > 0).astype(np.int64)
    return None


@dataclass
class Comparison:
    """A reference model (float32) against a candidate (quantized)."""

    reference: dict[str, Any]
    candidate: dict[str, Any]
    size_ratio: float
    eval_rows: int = 0
    top1_agreement: float | None = None
    accuracy_drop_points: float | None = None
    max_abs_diff: float | None = None
    mse: float | None = None
    snr_db: float | None = None
    evaluation: Evaluation | None = None
    host_default: dict[str, Any] | None = None  # figures of the host's saturating kernels, when they differ
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "candidate": self.candidate, "size_ratio": round(self.size_ratio, 4),
                "eval_rows": self.eval_rows, "top1_agreement": self.top1_agreement,
                "accuracy_drop_points": self.accuracy_drop_points, "max_abs_diff": self.max_abs_diff,
                "mse": self.mse, "snr_db": self.snr_db,
                "evaluation": self.evaluation.to_json() if self.evaluation else None,
                "host_default_kernels": self.host_default, "notes": self.notes}

    def table(self) -> str:
        ref, cand = self.reference, self.candidate
        w = max(len(ref["label"]), len(cand["label"]), 12)
        rows = [f"{'':<18}{ref['label']:>{w}}  {cand['label']:>{w}}"]
        size_note = "larger than the float file" if self.size_ratio > 1 else "of the float size"
        rows.append(f"{'size':<18}{_kb(ref['size_bytes']):>{w}}  {_kb(cand['size_bytes']):>{w}}  "
                    f"({self.size_ratio:.2f}x, {size_note})")
        if ref.get("accuracy") is not None:
            rows.append(f"{'accuracy':<18}{ref['accuracy'] * 100:>{w - 1}.2f}%  {cand['accuracy'] * 100:>{w - 1}.2f}%"
                        f"  ({0.0 - (self.accuracy_drop_points or 0.0):+.2f} points, {self.eval_rows} rows)")
        if self.top1_agreement is not None:
            rows.append(f"{'top-1 agreement':<18}{'':>{w}}  {self.top1_agreement * 100:>{w - 1}.2f}%")
        if self.max_abs_diff is not None:
            rows.append(f"{'max |difference|':<18}{'':>{w}}  {self.max_abs_diff:>{w}.3e}")
        if self.mse is not None:
            rows.append(f"{'mean sq. error':<18}{'':>{w}}  {self.mse:>{w}.3e}")
            snr = "inf" if self.snr_db is None or self.snr_db == float("inf") else f"{self.snr_db:.1f}"
            rows.append(f"{'SNR':<18}{'':>{w}}  {snr + ' dB':>{w}}")
        lat_r, lat_c = ref.get("latency"), cand.get("latency")
        if lat_r and lat_c:
            for key, label in (("p50_ms", "latency p50"), ("p90_ms", "latency p90")):
                rows.append(f"{label:<18}{lat_r[key]:>{w - 3}.3f} ms  {lat_c[key]:>{w - 3}.3f} ms  "
                            f"({speed_words(lat_r[key], lat_c[key])})")
            rows.append(f"{'':<18}batch {lat_r['batch']}, {lat_r['threads']} intra-op threads, ORT_ENABLE_ALL, "
                        f"{lat_r['runs']} runs after warm-up")
            if self.evaluation is not None:
                rows.append(f"{'':<18}{self.evaluation.latency_label()}")
        if self.evaluation is not None and self.eval_rows:
            rows.append(f"figures from: {self.evaluation.summary()}")
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)


def speed_words(reference_ms: float, candidate_ms: float) -> str:
    """"2.10x faster" or "1.52x slower": never a slowdown written as a speed-up."""
    if candidate_ms <= 0 or reference_ms <= 0:
        return "not measurable"
    ratio = reference_ms / candidate_ms
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} kB" if n < 1024 * 1024 else f"{n / 2**20:.2f} MB"


def _classifier_figures(ref_out: np.ndarray, cand_out: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    p_ref, p_cand = _predictions(ref_out), _predictions(cand_out)
    if p_ref is None or p_cand is None:
        return {}
    out: dict[str, Any] = {"top1_agreement": float(np.mean(p_ref == p_cand))}
    if labels is not None:
        y = labels.reshape(-1).astype(np.int64)
        out["reference_accuracy"] = float(np.mean(p_ref == y))
        out["accuracy"] = float(np.mean(p_cand == y))
        out["accuracy_drop_points"] = round((out["reference_accuracy"] - out["accuracy"]) * 100, 4)
    return out


def compare_models(reference: str | Path, candidate: str | Path, *, eval_set: Dataset | None = None,
                   labels: tuple[str, str] = ("float32", "quantized"), threads: int | None = None,
                   latency_batch: int = 1, runs: int = 100, warmup: int = 10, latency: bool = True,
                   evaluation: Evaluation | None = None) -> Comparison:
    """Compare ``candidate`` with ``reference`` on ``eval_set`` (and time both).

    ``evaluation`` says how the candidate's figures relate to its target; when
    the host's default int8 kernels would compute something else, their
    figures are measured too and reported beside (never instead of) the
    target-faithful ones."""
    ref_info: dict[str, Any] = {"label": labels[0], "file": Path(reference).name,
                                "size_bytes": Path(reference).stat().st_size}
    cand_info: dict[str, Any] = {"label": labels[1], "file": Path(candidate).name,
                                 "size_bytes": Path(candidate).stat().st_size}
    cmp = Comparison(ref_info, cand_info, cand_info["size_bytes"] / max(ref_info["size_bytes"], 1),
                     evaluation=evaluation)
    if cmp.size_ratio > 1:
        cmp.notes.append(f"the {labels[1]} file is {cmp.size_ratio:.2f}x the size of the float one: quantization "
                         "did not shrink this model (its weights sit in operators left in float, or are too few to "
                         "outweigh the added scales)")
    if eval_set is not None:
        with Progress(f"evaluating {labels[0]}", eval_set.rows, unit="examples") as p:
            ref_out = OnnxPredictor(reference, threads).predict(eval_set.inputs, p)
        with Progress(f"evaluating {labels[1]}", eval_set.rows, unit="examples") as p:
            cand_out = target_outputs(candidate, eval_set.inputs, threads=threads, evaluation=evaluation, progress=p)
        cmp.eval_rows = eval_set.rows
        diff = ref_out.astype(np.float64) - cand_out.astype(np.float64)
        cmp.max_abs_diff = float(np.max(np.abs(diff))) if diff.size else 0.0
        cmp.mse = float(np.mean(diff**2)) if diff.size else 0.0
        noise = float(np.sum(diff**2))
        cmp.snr_db = float(10 * np.log10(float(np.sum(ref_out.astype(np.float64) ** 2)) / noise)) if noise > 0 \
            else float("inf")
        figures = _classifier_figures(ref_out, cand_out, eval_set.labels)
        if figures:
            cmp.top1_agreement = figures["top1_agreement"]
            if "accuracy" in figures:
                ref_info["accuracy"], cand_info["accuracy"] = figures["reference_accuracy"], figures["accuracy"]
                cmp.accuracy_drop_points = figures["accuracy_drop_points"]
            else:
                cmp.notes.append("the evaluation set has no labels: agreement only, no accuracy")
        else:
            cmp.notes.append("the first output is not a classifier's (n, classes): compared by max |difference|, "
                             "mean squared error and SNR")
        if evaluation is not None and evaluation.host_default_differs:
            with Progress(f"evaluating {labels[1]} with this host's kernels", eval_set.rows, unit="examples") as p:
                host_out = OnnxPredictor(candidate, threads).predict(eval_set.inputs, p)
            cmp.host_default = _classifier_figures(ref_out, host_out, eval_set.labels)
            cmp.host_default["max_abs_diff"] = float(np.max(np.abs(ref_out.astype(np.float64) - host_out)))
            cmp.notes.append(_host_default_note(cmp.host_default))
    if latency:
        feeds = None
        if eval_set is not None and eval_set.rows >= latency_batch:
            feeds = eval_set.inputs
        lat = measure_latency([reference, candidate], batch=latency_batch, threads=threads, runs=runs,
                              warmup=warmup, feeds=feeds)
        ref_info["latency"], cand_info["latency"] = lat[0].to_json(), lat[1].to_json()
        if evaluation is not None:
            for info in (ref_info, cand_info):
                info["latency"]["measured_on"] = evaluation.host_text()
                info["latency"]["is_target_latency"] = evaluation.host_like_target
    return cmp


def _host_default_note(fig: dict[str, Any]) -> str:
    if "accuracy" in fig:
        what = f"accuracy {fig['accuracy'] * 100:.2f}% ({0.0 - fig['accuracy_drop_points']:+.2f} points)"
    elif "top1_agreement" in fig:
        what = f"top-1 agreement {fig['top1_agreement'] * 100:.2f}%"
    else:
        what = f"max |difference| {fig['max_abs_diff']:.3e}"
    return (f"this host's default ONNX Runtime int8 kernels saturate 16-bit pair sums with this model's full-range "
            f"weights and would give {what}: to serve on a CPU like this one, quantize with --target x86 --no-vnni")


def bench_models(paths: Sequence[str | Path], *, batches: Sequence[int] = (1,), threads: Sequence[int] = (0,),
                 runs: int = 100, warmup: int = 10) -> list[dict[str, Any]]:
    """Latency of each model at each batch size and thread count."""
    rows = []
    for t in threads:
        for b in batches:
            lats = measure_latency(paths, batch=b, threads=t or None, runs=runs, warmup=warmup)
            for p, lat in zip(paths, lats, strict=True):
                rows.append({"model": str(p), "size_bytes": Path(p).stat().st_size, **lat.to_json()})
    return rows
