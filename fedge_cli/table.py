"""The live per-round table that ``fedge demo`` and ``fedge watch`` print."""

from __future__ import annotations

from typing import TextIO

from fedge.records import RoundRecord


class RoundTable:
    """The live per-round table."""

    COLUMNS = ("round", "clients", "accuracy", "loss", "up KB", "down KB", "seconds")

    def __init__(self, out: TextIO, privacy: bool = False) -> None:
        self.out = out
        self.privacy = privacy  # an epsilon column: the job is differentially private

    def header(self) -> None:
        line = "{:>5} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8}".format(*self.COLUMNS)
        self.out.write(line + (f" {'epsilon':>8}" if self.privacy else "") + "\n")
        self.out.flush()

    def row(self, r: RoundRecord) -> None:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        self.out.write(
            f"{r.round:>5} {f'{r.clients}/{r.selected}':>8} {acc:>9} {loss:>8} "
            f"{r.bytes_up / 1024:>9.1f} {r.bytes_down / 1024:>9.1f} {r.seconds:>8.3f}"
            + (f" {_epsilon(r):>8}" if self.privacy else "") + "\n"
        )
        self.out.flush()


def _epsilon(r: RoundRecord) -> str:
    eps = r.extra.get("epsilon")
    return f"{eps:.3f}" if isinstance(eps, (int, float)) else "-"
