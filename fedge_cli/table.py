"""The live per-round table that ``fedge demo`` and ``fedge watch`` print."""

from __future__ import annotations

from typing import TextIO

from fedge.records import RoundRecord


class RoundTable:
    """The live per-round table."""

    COLUMNS = ("round", "clients", "accuracy", "loss", "up KB", "down KB", "seconds")

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def header(self) -> None:
        self.out.write("{:>5} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8}\n".format(*self.COLUMNS))
        self.out.flush()

    def row(self, r: RoundRecord) -> None:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        self.out.write(
            f"{r.round:>5} {f'{r.clients}/{r.selected}':>8} {acc:>9} {loss:>8} "
            f"{r.bytes_up / 1024:>9.1f} {r.bytes_down / 1024:>9.1f} {r.seconds:>8.3f}\n"
        )
        self.out.flush()
