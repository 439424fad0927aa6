"""Training worker processes, kept warm or started per round.

``TrainingPool`` runs requests on ``size`` worker processes (one request per
worker at a time). ``mode='per_round'`` starts a worker for each request and
lets it exit afterwards, so an idle device holds no PyTorch in memory;
``mode='warm'`` keeps workers alive between rounds (faster, and how a
simulated fleet shares a few workers among many devices).

A worker that dies (killed for memory, segfault) or overruns ``timeout_s``
fails only its own request; the pool starts a fresh one for the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

from edge_agent.worker import read_frame, write_frame
from fedge import wire
from fedge.wire import Envelope, Kind, WireError

log = logging.getLogger("fedge.agent.pool")


@dataclass(frozen=True)
class Outcome:
    result: Envelope | None  # a TRAIN_RESULT
    error: str = ""


class _Worker:
    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "edge_agent.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, request: bytes, timeout_s: float) -> Outcome:
        timer = threading.Timer(timeout_s, self.proc.kill)
        timer.daemon = True
        timer.start()
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            write_frame(cast(BinaryIO, self.proc.stdin), request)
            reply = read_frame(cast(BinaryIO, self.proc.stdout))
        except (BrokenPipeError, OSError, ValueError):
            reply = None
        finally:
            timer.cancel()
        if reply is None:
            code = self.proc.wait()
            if code in (-9, 137):
                why = f"killed (exit {code}): out of memory, or longer than worker.timeout_s={timeout_s:g}s"
            else:
                why = f"exited with code {code}"
            return Outcome(None, f"training worker {why}")
        try:
            env = wire.decode(reply)
        except WireError as exc:
            return Outcome(None, f"training worker sent a bad reply: {exc}")
        if env.kind == Kind.TRAIN_ERROR:
            return Outcome(None, str(env.header.get("error", "unknown error")))
        if env.kind != Kind.TRAIN_RESULT:
            return Outcome(None, f"training worker sent {env.kind.name}")
        return Outcome(env)

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TrainingPool:
    def __init__(self, size: int = 1, mode: str = "per_round", threads: int = 0, timeout_s: float = 3600.0,
                 python: str = "") -> None:
        if mode not in ("per_round", "warm"):
            raise ValueError(f"worker.mode {mode!r} is not known; use per_round or warm")
        self.mode = mode
        self.timeout_s = timeout_s
        self.python = python or sys.executable
        self.env = dict(os.environ)
        # The worker imports fedge from wherever this process found it.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (here, self.env.get("PYTHONPATH", "")) if p)
        if threads > 0:
            self.env["FEDGE_WORKER_THREADS"] = str(threads)
        self._jobs: queue.Queue[tuple[bytes, Callable[[Outcome], None]] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._serve, name=f"fedge-train-{i}", daemon=True)
                         for i in range(size)]
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        for t in self._threads:
            t.start()

    def submit(self, request: bytes, done: Callable[[Outcome], None]) -> None:
        """Run ``request`` on a free worker; ``done`` is called from a pool
        thread with the outcome."""
        self._jobs.put((request, done))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            for w in self._workers:
                w.close()
            self._workers.clear()

    def _spawn(self) -> _Worker:
        w = _Worker(self.python, self.env)
        with self._lock:
            self._workers.append(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.close()
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)

    def _serve(self) -> None:
        worker = self._spawn() if self.mode == "warm" else None
        while True:
            job = self._jobs.get()
            if job is None:
                if worker is not None:
                    self._retire(worker)
                return
            request, done = job
            if worker is None or not worker.alive():
                if worker is not None:
                    self._retire(worker)
                worker = self._spawn()
            try:
                outcome = worker.run(request, self.timeout_s)
            except Exception as exc:  # never let a pool thread die
                outcome = Outcome(None, f"training worker failed: {exc}")
            if self.mode == "per_round" or not worker.alive():
                self._retire(worker)
                worker = None
            try:
                done(outcome)
            except Exception:
                log.exception("training callback failed")
