"""ONNX artifacts of the global model, for inference-only devices.

Every ``onnx.every`` closed rounds the aggregator hands its new global model
to the export toolchain and publishes the result. The toolchain runs as the
public CLI (``fedge export``, then ``fedge quantize``) in a child process on
a background thread: the aggregator never imports the export role, a crash
or a hang in an exporter cannot take the job down (it is killed after
``onnx.timeout_s``), and rounds keep folding while it works. One export runs
at a time; if rounds close faster, only the newest model waits its turn.

Results come back to the service's thread as ``ArtifactBuilt`` or
``ArtifactFailed`` through the same inbox as MQTT events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.config import AggregatorConfig
from fedge.files import atomic_write
from fedge.messages import Artifact

if TYPE_CHECKING:
    from aggregator.retained import Retained
    from fedge.topics import JobTopics

log = logging.getLogger("fedge.aggregator.onnx")


@dataclass(frozen=True)
class ArtifactBuilt:
    round: int
    message: bytes  # an Artifact envelope
    summary: dict


@dataclass(frozen=True)
class ArtifactFailed:
    round: int
    error: str


class OnnxPublisher:
    def __init__(self, cfg: AggregatorConfig, workdir: Path, deliver: Callable[[object], None]) -> None:
        # cfg has passed AggregatorConfig.check (the service runs it): onnx.inputs is a valid signature.
        self.cfg = cfg
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.deliver = deliver
        self._lock = threading.Lock()
        self._waiting: tuple[int, bytes] | None = None
        self._thread: threading.Thread | None = None

    def due(self, round_: int, last: bool) -> bool:
        every = self.cfg.onnx.every
        return every > 0 and (last or round_ % every == 0)

    def submit(self, round_: int, model_message: bytes) -> None:
        with self._lock:
            self._waiting = (round_, model_message)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._drain, name="fedge-onnx", daemon=True)
                self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._waiting is not None or (self._thread is not None and self._thread.is_alive())

    def _drain(self) -> None:
        while True:
            with self._lock:
                job, self._waiting = self._waiting, None
                if job is None:
                    return
            round_, message = job
            try:
                self.deliver(self._build(round_, message))
            except Exception as exc:  # report, never kill the thread silently
                self.deliver(ArtifactFailed(round_, f"{type(exc).__name__}: {exc}"))

    def _run(self, args: list[str]) -> str | None:
        """Run one export-toolchain subcommand; None on success, else its error line."""
        cmd = [sys.executable, "-m", "export.cli", *args]  # the export role's own CLI: no role imports another
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.cfg.onnx.timeout_s)
        except subprocess.TimeoutExpired:
            return f"`fedge {args[0]}` took longer than onnx.timeout_s={self.cfg.onnx.timeout_s:g}s"
        if proc.returncode == 0:
            return None
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"`fedge {args[0]}` exited with {proc.returncode}"

    def _quantize(self, round_: int, float_path: Path) -> tuple[Path, str, dict] | ArtifactFailed:
        """The float32 export quantized as ``onnx.quantize`` asks: (its file,
        its variant, the quantizer's report)."""
        o, ev = self.cfg.onnx, self.cfg.evaluate
        final = self.workdir / f"{o.name}.{o.quantize}.onnx"
        report_path = self.workdir / "quantize.json"
        q = ["quantize", "--model", str(float_path), "--out", str(final), "--mode", o.quantize,
             "--target", o.target, "--json", str(report_path), "--no-latency", "--force"]
        calibration, cal_args = (o.calibration, o.calibration_args) if o.calibration else (ev.data, ev.args)
        if o.quantize == "static":
            if not calibration:
                return ArtifactFailed(round_, "static quantization needs onnx.calibration or [evaluate] data")
            q += ["--calibration", calibration, "--calibration-args", json.dumps(cal_args)]
        if ev.data:
            q += ["--eval", ev.data, "--eval-args", json.dumps(ev.args)]
            if o.max_accuracy_drop > 0:
                q += ["--max-accuracy-drop", str(o.max_accuracy_drop)]
        error = self._run(q)
        if error:
            return ArtifactFailed(round_, f"quantization failed: {error}")
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        return final, "fp16" if o.quantize == "fp16" else "int8", report

    def _build(self, round_: int, message: bytes) -> ArtifactBuilt | ArtifactFailed:
        o = self.cfg.onnx
        source = self.workdir / "global.fedge"
        atomic_write(source, message)
        float_path = self.workdir / f"{o.name}.float32.onnx"
        args = ["export", "--weights", str(source), "--out", str(float_path), "--opset", str(o.opset), "--force"]
        for spec in o.inputs:
            args += ["--input", spec]
        error = self._run(args)
        if error:
            return ArtifactFailed(round_, f"export failed: {error}")
        final, variant = float_path, "float32"
        report: dict = {}
        if o.quantize != "none":
            quantized = self._quantize(round_, float_path)
            if isinstance(quantized, ArtifactFailed):
                return quantized
            final, variant, report = quantized
        body = final.read_bytes()
        manifest_file = final.with_name(final.stem + ".manifest.json")
        manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
        digest = hashlib.sha256(body).hexdigest()
        manifest.setdefault("sha256", digest)
        artifact = Artifact(job=self.cfg.job.name, round=round_, name=o.name, format="onnx", variant=variant,
                            sha256=digest, manifest=manifest, body=body)
        summary = {"round": round_, "variant": variant, "bytes": len(body), "sha256": digest,
                   "float_bytes": float_path.stat().st_size}
        if report:
            summary.update(float_accuracy=report.get("reference", {}).get("accuracy"),
                           accuracy=report.get("candidate", {}).get("accuracy"),
                           top1_agreement=report.get("top1_agreement"),
                           accuracy_drop_points=report.get("accuracy_drop_points"))
            host = report.get("host_default_kernels")
            if isinstance(host, dict) and host.get("accuracy") is not None:
                # The target's arithmetic differs from this host's default
                # int8 kernels (x86 without VNNI): what an x86 device like
                # this one computes with the file.
                summary["host_accuracy"] = host["accuracy"]
        return ArtifactBuilt(round_, artifact.encode(), summary)


def publish_artifact(retained: Retained, topics: JobTopics, name: str, built: ArtifactBuilt) -> None:
    """Publish a built artifact, retained and chunked, for inference devices."""
    retained.chunked(f"artifact/{name}", lambda i: topics.artifact_chunk(name, i), built.message)
    log.info("published ONNX %s of round %d: %d bytes%s", built.summary["variant"], built.round,
             built.summary["bytes"], "" if built.summary.get("accuracy") is None
             else f", accuracy {built.summary['accuracy']:.4f} (float32 {built.summary['float_accuracy']:.4f})")
