"""The live per-round table that ``fedge demo`` and ``fedge watch`` print."""

from __future__ import annotations

from typing import TextIO

from fedge.records import RoundRecord

# What the two byte columns count, by who counted them. The aggregator's round
# record counts what it handled: the update messages it received (up); each
# model message it published once, plus the announcement once per online
# device (down). The demo also measures what all its agents sent and received
# as MQTT payloads: every device's copy of the model counts there.
BYTES = {
    "aggregator": (("up KiB", "down KiB"),
                   "bytes: up = update messages the aggregator received; down = what it published (each model "
                   "message once, the announcement once per online device)"),
    "agents": (("sent KiB", "recv KiB"),
               "bytes: sent / recv = MQTT payloads all agents sent / received (every agent's copy of the model "
               "counts)"),
}


class RoundTable:
    """The live per-round table; ``bytes_by`` says whose byte counts the rows
    carry ("aggregator": the records' own; "agents": measured on the
    devices, passed to ``row``), and the header says what they count."""

    def __init__(self, out: TextIO, privacy: bool = False, bytes_by: str = "aggregator",
                 buffered: bool = False) -> None:
        self.out = out
        self.privacy = privacy  # an epsilon column: the job is differentially private
        self.bytes_by = bytes_by
        # A buffered job's rows are versions: updates folded (nobody is selected) and their staleness.
        self.buffered = buffered
        first = ("version", "updates") if buffered else ("round", "clients")
        self.columns = (*first, "accuracy", "loss", *BYTES[bytes_by][0], "seconds")

    def header(self) -> None:
        """What the byte columns count, then the column names."""
        line = "{:>7} {:>8} {:>9} {:>8} {:>9} {:>9} {:>8}".format(*self.columns)
        extra = (f" {'staleness mean/max':>18}" if self.buffered else "") + (f" {'epsilon':>8}" if self.privacy else "")
        self.out.write(BYTES[self.bytes_by][1] + "\n" + line + extra + "\n")
        self.out.flush()

    def row(self, r: RoundRecord, measured: tuple[int, int] | None = None) -> None:
        """One round; ``measured``: (sent, received) bytes, for ``bytes_by="agents"``."""
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        up, down = measured if measured is not None else (r.bytes_up, r.bytes_down)
        clients = str(r.clients) if self.buffered else f"{r.clients}/{r.selected}"
        relayed = r.extra.get("relayed")
        if isinstance(relayed, dict):  # a relayed job's root counts relays; its regions count the devices
            clients = f"{relayed.get('devices', 0)}/{relayed.get('selected', 0)}"
        self.out.write(
            f"{r.round:>7} {clients:>8} {acc:>9} {loss:>8} "
            f"{up / 1024:>9.1f} {down / 1024:>9.1f} {r.seconds:>8.3f}"
            + (f" {_staleness(r):>18}" if self.buffered else "")
            + (f" {_epsilon(r):>8}" if self.privacy else "") + "\n"
        )
        self.out.flush()


def _staleness(r: RoundRecord) -> str:
    """A buffered version's updates: mean and largest staleness."""
    b = r.extra.get("buffered")
    if not isinstance(b, dict) or b.get("staleness_mean") is None:
        return "-"
    return f"{b['staleness_mean']:.2f}/{b.get('staleness_max')}"


def _epsilon(r: RoundRecord) -> str:
    eps = r.extra.get("epsilon")
    return f"{eps:.3f}" if isinstance(eps, (int, float)) else "-"
