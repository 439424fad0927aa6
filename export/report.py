"""How two ONNX files compare: accuracy, top-1 agreement, size and latency.

Owns the measurements behind ``fedge quantize``'s report and ``fedge
bench-model``. Latency is measured the way a device runs the model: ONNX
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
from fedge.onnxrt import ORT_TYPES, OnnxPredictor, default_threads, open_session

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
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "candidate": self.candidate, "size_ratio": round(self.size_ratio, 4),
                "eval_rows": self.eval_rows, "top1_agreement": self.top1_agreement,
                "accuracy_drop_points": self.accuracy_drop_points, "max_abs_diff": self.max_abs_diff,
                "notes": self.notes}

    def table(self) -> str:
        ref, cand = self.reference, self.candidate
        w = max(len(ref["label"]), len(cand["label"]), 12)
        rows = [f"{'':<18}{ref['label']:>{w}}  {cand['label']:>{w}}"]
        rows.append(f"{'size':<18}{_kb(ref['size_bytes']):>{w}}  {_kb(cand['size_bytes']):>{w}}  "
                    f"({self.size_ratio:.2f}x)")
        if ref.get("accuracy") is not None:
            rows.append(f"{'accuracy':<18}{ref['accuracy'] * 100:>{w - 1}.2f}%  {cand['accuracy'] * 100:>{w - 1}.2f}%"
                        f"  ({-(self.accuracy_drop_points or 0.0):+.2f} points, {self.eval_rows} rows)")
        if self.top1_agreement is not None:
            rows.append(f"{'top-1 agreement':<18}{'':>{w}}  {self.top1_agreement * 100:>{w - 1}.2f}%")
        if self.max_abs_diff is not None:
            rows.append(f"{'max |difference|':<18}{'':>{w}}  {self.max_abs_diff:>{w}.3e}")
        lat_r, lat_c = ref.get("latency"), cand.get("latency")
        if lat_r and lat_c:
            for key, label in (("p50_ms", "latency p50"), ("p90_ms", "latency p90")):
                speed = lat_r[key] / lat_c[key] if lat_c[key] > 0 else float("inf")
                rows.append(f"{label:<18}{lat_r[key]:>{w - 3}.3f} ms  {lat_c[key]:>{w - 3}.3f} ms  "
                            f"({speed:.2f}x faster)")
            rows.append(f"{'':<18}batch {lat_r['batch']}, {lat_r['threads']} intra-op threads, ORT_ENABLE_ALL, "
                        f"{lat_r['runs']} runs after warm-up")
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} kB" if n < 1024 * 1024 else f"{n / 2**20:.2f} MB"


def compare_models(reference: str | Path, candidate: str | Path, *, eval_set: Dataset | None = None,
                   labels: tuple[str, str] = ("float32", "quantized"), threads: int | None = None,
                   latency_batch: int = 1, runs: int = 100, warmup: int = 10, latency: bool = True) -> Comparison:
    ref_info: dict[str, Any] = {"label": labels[0], "file": Path(reference).name,
                                "size_bytes": Path(reference).stat().st_size}
    cand_info: dict[str, Any] = {"label": labels[1], "file": Path(candidate).name,
                                 "size_bytes": Path(candidate).stat().st_size}
    cmp = Comparison(ref_info, cand_info, cand_info["size_bytes"] / max(ref_info["size_bytes"], 1))
    if eval_set is not None:
        ref_out = OnnxPredictor(reference, threads).predict(eval_set.inputs)
        cand_out = OnnxPredictor(candidate, threads).predict(eval_set.inputs)
        cmp.eval_rows = eval_set.rows
        cmp.max_abs_diff = float(np.max(np.abs(ref_out.astype(np.float64) - cand_out.astype(np.float64))))
        p_ref, p_cand = _predictions(ref_out), _predictions(cand_out)
        if p_ref is not None and p_cand is not None:
            cmp.top1_agreement = float(np.mean(p_ref == p_cand))
            if eval_set.labels is not None:
                y = eval_set.labels.reshape(-1).astype(np.int64)
                ref_info["accuracy"] = float(np.mean(p_ref == y))
                cand_info["accuracy"] = float(np.mean(p_cand == y))
                cmp.accuracy_drop_points = round((ref_info["accuracy"] - cand_info["accuracy"]) * 100, 4)
            else:
                cmp.notes.append("the evaluation set has no labels: agreement only, no accuracy")
        else:
            cmp.notes.append("the first output is not a classifier's (n, classes): no accuracy or agreement")
    if latency:
        feeds = None
        if eval_set is not None and eval_set.rows >= latency_batch:
            feeds = eval_set.inputs
        lat = measure_latency([reference, candidate], batch=latency_batch, threads=threads, runs=runs,
                              warmup=warmup, feeds=feeds)
        ref_info["latency"], cand_info["latency"] = lat[0].to_json(), lat[1].to_json()
    return cmp


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
