"""Where the aggregator's CPU goes, by stage, measured in the real process.

The service's main thread does a message's work in stages: receiving it
(dispatch, chunk reassembly, rate limits), checking its signature, the
round core's handling of it, signing and publishing what follows, and so
on. ``StageClock`` charges the main thread's CPU time
(``time.thread_time``) to the stage it is in: entering a stage charges the
time so far to the stage it interrupts, so stages nest without counting
anything twice, and whatever runs outside every stage is ``other``. The
MQTT network thread's CPU is ``mqtt`` (read from /proc, in clock ticks), and
the rest of the process (the metrics listener, the ONNX exporter,
PyTorch's threads during an evaluation) ``other_threads``.

Each round's record carries what it cost since the previous record
(``RoundRecord.cpu_seconds``), and the metrics the totals
(``fedge_aggregator_cpu_seconds_total{stage}``). A clock reading is a
system call of well under a microsecond; a message passes through a few
stages.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

# The main thread's stages, in the order the metrics list them.
STAGES = ("receive", "verify", "update", "presence", "round", "publish", "records", "save", "evaluate", "other")
THREADS = ("mqtt", "other_threads")


class _Stage:
    __slots__ = ("clock", "name")

    def __init__(self, clock: StageClock, name: str) -> None:
        self.clock = clock
        self.name = name

    def __enter__(self) -> None:
        self.clock.enter(self.name)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.clock.leave()


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_cpu(native_id: int | None) -> float:
    """CPU seconds of the thread whose kernel id is ``native_id``, from
    /proc (0 when it is gone, unknown, or there is no /proc). Read from the
    kernel, never through the thread's pthread handle, which is not safe to
    use once the thread has ended."""
    if native_id is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


class StageClock:
    """CPU seconds of the thread that made it, by stage; call only from it.

    ``with clock.stage("verify"): ...`` charges what runs inside to
    ``verify``; ``take()`` returns each stage's seconds since the last
    ``take`` (and the network thread's and the rest of the process's), and
    ``totals`` holds them since the start."""

    def __init__(self, network_thread: Callable[[], int | None] = lambda: None) -> None:
        self._network_thread = network_thread
        self._stages = {name: _Stage(self, name) for name in STAGES}
        self._stack = ["other"]
        self._since = {name: 0.0 for name in STAGES}
        self.totals = {name: 0.0 for name in (*STAGES, *THREADS)}
        self.start()

    def start(self) -> None:
        """Count from now, on the calling thread (a service may be made on
        one thread and run on another)."""
        self._t = time.thread_time()
        self._mqtt = _thread_cpu(self._network_thread())
        self._process = time.process_time()

    def stage(self, name: str) -> _Stage:
        return self._stages[name]

    def enter(self, name: str) -> None:
        now = time.thread_time()
        self._since[self._stack[-1]] += now - self._t
        self._t = now
        self._stack.append(name)

    def leave(self) -> None:
        now = time.thread_time()
        self._since[self._stack.pop()] += now - self._t
        self._t = now

    def current(self) -> dict[str, float]:
        """The totals so far, the main thread's up to its last change of
        stage, for the metrics (nothing is reset)."""
        out = {name: self.totals[name] + self._since[name] for name in STAGES}
        mqtt = _thread_cpu(self._network_thread())
        out["mqtt"] = self.totals["mqtt"] + max(0.0, mqtt - self._mqtt)
        out["other_threads"] = self.totals["other_threads"]
        return {name: round(seconds, 4) for name, seconds in out.items()}

    def take(self) -> dict[str, float]:
        """Seconds by stage since the last call (stages that took none are
        left out); the totals grow by as much."""
        now = time.thread_time()
        self._since[self._stack[-1]] += now - self._t
        self._t = now
        out = dict(self._since)
        for name in self._since:
            self._since[name] = 0.0
        mqtt = _thread_cpu(self._network_thread())
        if mqtt < self._mqtt:  # a new network thread (the link was made again): its clock starts at 0
            self._mqtt = 0.0
        out["mqtt"] = mqtt - self._mqtt
        self._mqtt = mqtt
        process = time.process_time()
        main = sum(out[name] for name in STAGES)
        out["other_threads"] = max(0.0, process - self._process - main - out["mqtt"])
        self._process = process
        for name, seconds in out.items():
            self.totals[name] += seconds
        return {name: round(seconds, 4) for name, seconds in out.items() if seconds >= 0.00005}


class _Clocked(Protocol):
    cpu: StageClock


F = TypeVar("F", bound=Callable[..., Any])


def staged(name: str) -> Callable[[F], F]:
    """A method of an object with a ``cpu`` clock whose work is charged to
    stage ``name`` (stages entered inside it take their own)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(self: _Clocked, *args: Any, **kwargs: Any) -> Any:
            clock = self.cpu
            clock.enter(name)
            try:
                return fn(self, *args, **kwargs)
            finally:
                clock.leave()

        return run  # type: ignore[return-value]

    return wrap
