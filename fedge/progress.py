"""One line of progress on a terminal for work that takes a while
(calibration, evaluation, benchmarks, the demo's first round), and silence
when the output is not a terminal (a log file, a pipe, CI).

    with Progress("calibrating", total=rows, unit="rows") as p:
        for batch in batches:
            ...
            p.advance(len(batch))

The line is redrawn at most ten times a second and erased when the work
ends, so what a command prints afterwards starts on a clean line. Several
threads may report into one ``Progress`` (a lock guards the line), and
``clear()`` erases it before another thread writes something of its own.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a real stream
        return False


class Progress:
    def __init__(self, label: str, total: int | None = None, *, unit: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = interactive(self.stream) if enabled is None else enabled
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.note = ""
        self.interval = interval
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        self.draw(force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        self.draw()

    def set(self, done: int | None = None, note: str | None = None, total: int | None = None) -> None:
        if done is not None:
            self.done = done
        if note is not None:
            self.note = note
        if total is not None:
            self.total = total
        self.draw()

    def text(self) -> str:
        parts = [f"{self.label}:"]
        if self.total:
            parts.append(f"{self.done}/{self.total}{' ' + self.unit if self.unit else ''} "
                         f"({100 * self.done / self.total:.0f}%)")
        elif self.done:
            parts.append(f"{self.done}{' ' + self.unit if self.unit else ''}")
        if self.note:
            parts.append(self.note)
        parts.append(f"{time.monotonic() - self.started:.0f} s")
        return " ".join(parts)

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < self.interval:
            return
        with self._lock:
            if not self.enabled:  # closed by another thread meanwhile
                return
            self._drawn = now
            line = self.text()
            pad = max(0, self._width - len(line))
            self._width = len(line)
            try:
                self.stream.write("\r" + line + " " * pad)
                self.stream.flush()
            except (OSError, ValueError):
                self.enabled = False

    def clear(self) -> None:
        """Erase the line (it is drawn again at the next update)."""
        if not self.enabled or not self._width:
            return
        with self._lock:
            try:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                self.enabled = False
            self._width = 0

    def close(self) -> None:
        self.clear()
        with self._lock:
            self.enabled = False
