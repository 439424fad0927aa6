"""Training worker processes, kept warm or started per round.

``TrainingPool`` runs requests on ``size`` worker processes (one request per
worker at a time). ``mode='per_round'`` starts a worker for each request and
lets it exit afterwards, so an idle device holds no PyTorch in memory;
``mode='warm'`` keeps workers alive between rounds (faster, and how a
simulated fleet shares a few workers among many devices).

``submit`` runs one device's round (a ``TRAIN_REQUEST``); ``submit_batch``
runs many devices' rounds from one global model (a ``TRAIN_BATCH``, see
``edge_agent.worker``), reporting each device as its reply arrives. Both
share the workers and one queue, served in the order submitted.

A worker that dies (killed for memory, segfault) or overruns ``timeout_s``
(a batch: the whole batch) fails only its own request (the items of a batch
it had not answered); the pool starts a fresh one for the next.
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


@dataclass(frozen=True)
class _Single:
    request: bytes
    done: Callable[[Outcome], None]


@dataclass(frozen=True)
class _Batch:
    request: bytes
    count: int
    done: Callable[[int, Outcome], None]


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
            return Outcome(None, self._exit_reason(timeout_s))
        try:
            env = wire.decode(reply)
        except WireError as exc:
            return Outcome(None, f"training worker sent a bad reply: {exc}")
        if env.kind == Kind.TRAIN_ERROR:
            return Outcome(None, str(env.header.get("error", "unknown error")))
        if env.kind != Kind.TRAIN_RESULT:
            return Outcome(None, f"training worker sent {env.kind.name}")
        return Outcome(env)

    def run_batch(self, request: bytes, count: int, timeout_s: float,
                  done: Callable[[int, Outcome], None]) -> None:
        """Run a TRAIN_BATCH of ``count`` items, calling ``done(i, outcome)``
        as each item's reply arrives. Every item gets exactly one call: those
        the worker leaves unanswered (it died, overran ``timeout_s``, or sent
        a bad reply, after which it is killed: what else it would send is
        unknown) fail with the reason."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        answered = bytearray(count)
        left = count
        why = "training worker failed"
        timer = threading.Timer(timeout_s, self.proc.kill)
        timer.daemon = True
        timer.start()
        try:
            with contextlib.suppress(OSError):  # a worker that is gone: its exit says why, below
                write_frame(cast(BinaryIO, self.proc.stdin), request)
            while left:
                try:
                    reply = read_frame(cast(BinaryIO, self.proc.stdout))
                except OSError:
                    reply = None
                except ValueError as exc:  # a length no frame has
                    why = self._bad_reply(str(exc), left)
                    break
                if reply is None:
                    timer.cancel()
                    why = self._exit_reason(timeout_s)
                    break
                try:
                    env = wire.decode(reply)
                except WireError as exc:
                    why = self._bad_reply(str(exc), left)
                    break
                index = env.header.get("index", -1)
                if env.kind == Kind.TRAIN_ERROR and index == -1 and left == count:
                    # The batch as a whole (its items unreadable, or the frame itself).
                    why = str(env.header.get("error", "unknown error"))
                    break
                if env.kind not in (Kind.TRAIN_RESULT, Kind.TRAIN_ERROR):
                    why = self._bad_reply(f"{env.kind.name}", left)
                    break
                if type(index) is not int or not 0 <= index < count or answered[index]:
                    what = "repeated" if type(index) is int and 0 <= index < count else "out of range"
                    why = self._bad_reply(f"item index {index!r} {what} (a batch of {count})", left)
                    break
                answered[index] = 1
                left -= 1
                if env.kind == Kind.TRAIN_RESULT:
                    _call(done, index, Outcome(env))
                else:
                    _call(done, index, Outcome(None, str(env.header.get("error", "unknown error"))))
        finally:
            timer.cancel()
            if left:
                for i in range(count):
                    if not answered[i]:
                        _call(done, i, Outcome(None, why))

    def _exit_reason(self, timeout_s: float) -> str:
        code = self.proc.wait()
        if code in (-9, 137):
            why = f"killed (exit {code}): out of memory, or longer than worker.timeout_s={timeout_s:g}s"
        else:
            why = f"exited with code {code}"
        return f"training worker {why}"

    def _bad_reply(self, what: str, left: int) -> str:
        """Kill a worker whose replies cannot be trusted; the reason its
        ``left`` unanswered items fail (logged once)."""
        log.warning("training worker sent a bad reply to a batch (%s); its %d unanswered items fail", what, left)
        self.proc.kill()
        self.proc.wait()
        return f"training worker sent a bad reply: {what}"

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _call(done: Callable[[int, Outcome], None], index: int, outcome: Outcome) -> None:
    try:
        done(index, outcome)
    except Exception:
        log.exception("training callback failed")


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
        self._jobs: queue.Queue[_Single | _Batch | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._serve, name=f"fedge-train-{i}", daemon=True)
                         for i in range(size)]
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        for t in self._threads:
            t.start()

    def submit(self, request: bytes, done: Callable[[Outcome], None]) -> None:
        """Run ``request`` on a free worker; ``done`` is called from a pool
        thread with the outcome."""
        self._jobs.put(_Single(request, done))

    def submit_batch(self, request: bytes, count: int, done: Callable[[int, Outcome], None]) -> None:
        """Run a TRAIN_BATCH of ``count`` items on a free worker; ``done(i,
        outcome)`` is called from a pool thread for each item as its result
        arrives (in completion order). Every item gets exactly one call: if
        the worker dies or times out mid-batch, each item not yet answered
        gets Outcome(None, <why>). ``timeout_s`` bounds the whole batch.

        ValueError when ``request`` is plainly not a batch of ``count``
        items (another kind, or a list of items of another length); a
        header the worker cannot read fails every item instead."""
        if count < 1:
            raise ValueError(f"a batch has at least one item, not {count}")
        peeked = wire.peek(request)
        if peeked is not None:
            kind, header = peeked
            if kind != Kind.TRAIN_BATCH:
                raise ValueError(f"submit_batch takes a TRAIN_BATCH request, not {kind.name}")
            items = header.get("items")
            if isinstance(items, list) and len(items) != count:
                raise ValueError(f"the request has {len(items)} items, not {count}")
        self._jobs.put(_Batch(request, count, done))

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
            if worker is None or not worker.alive():
                if worker is not None:
                    self._retire(worker)
                worker = self._spawn()
            outcome = None
            if isinstance(job, _Batch):
                try:  # the items are answered as they come
                    worker.run_batch(job.request, job.count, self.timeout_s, job.done)
                except Exception:  # never let a pool thread die (every item has had its call)
                    log.exception("training batch failed")
            else:
                try:
                    outcome = worker.run(job.request, self.timeout_s)
                except Exception as exc:  # never let a pool thread die
                    outcome = Outcome(None, f"training worker failed: {exc}")
            if self.mode == "per_round" or not worker.alive():
                self._retire(worker)
                worker = None
            if isinstance(job, _Single) and outcome is not None:
                try:
                    job.done(outcome)
                except Exception:
                    log.exception("training callback failed")
