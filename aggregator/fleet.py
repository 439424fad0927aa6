"""The aggregator's record of each device, for ``fedge status``.

The shell keeps one ``DeviceEntry`` per device whose presence it believed:
online or not, when it last heard from it (its own clock, so a device with
a wrong clock cannot move it), how many of its updates were accepted, its
last receipt, and what its presence said about it (``messages.device_info``,
typed and bounded). Entries that changed are published retained on
``fedge/v1/<job>/device/<id>`` at most once a second, and the whole ledger is
kept in the state directory (``fleet.json``) at each round's end, so a
restarted aggregator keeps its counts.

Bounded: at most ``max_devices`` entries; a new device over that evicts the
offline one heard from longest ago, or is not tracked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fedge.messages import DeviceRecord, device_info
from fedge.topics import check_id

log = logging.getLogger(__name__)

FILE = "fleet.json"


@dataclass
class DeviceEntry:
    online: bool = False
    last_seen: float = 0.0
    rounds: int = 0
    last_receipt: str = ""
    last_round: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class Fleet:
    def __init__(self, job: str, max_devices: int) -> None:
        self.job = job
        self.max_devices = max_devices
        self.entries: dict[str, DeviceEntry] = {}
        self.dirty: set[str] = set()  # to publish
        self.changed = False  # to save

    def _entry(self, client: str, create: bool) -> DeviceEntry | None:
        entry = self.entries.get(client)
        if entry is not None or not create:
            return entry
        if len(self.entries) >= self.max_devices:
            offline = [(e.last_seen, c) for c, e in self.entries.items() if not e.online]
            if not offline:
                return None
            _, oldest = min(offline)
            del self.entries[oldest]
            self.dirty.discard(oldest)
        entry = self.entries[client] = DeviceEntry()
        return entry

    def presence(self, client: str, online: bool, info: dict[str, Any], now: float) -> None:
        """A believed presence (``online``, with its info) or a last will."""
        entry = self._entry(client, create=online)
        if entry is None:
            return
        if online:
            entry.info = device_info(info)
            entry.last_seen = now
        # An offline arriving now may be a will that fired long ago (retained,
        # delivered at our start): it does not say when the device was last seen.
        if online or entry.online:
            self.dirty.add(client)
            self.changed = True
        entry.online = online

    def heard(self, client: str, now: float) -> None:
        """A message from ``client`` (published with its next change)."""
        entry = self.entries.get(client)
        if entry is not None:
            entry.last_seen = now

    def receipt(self, client: str, receipt: str, round_: int, now: float) -> None:
        entry = self.entries.get(client)
        if entry is None:
            return
        entry.last_receipt = receipt
        entry.last_round = max(entry.last_round, round_)
        entry.last_seen = now
        if receipt == "accepted":
            entry.rounds += 1
        self.dirty.add(client)
        self.changed = True

    def take_dirty(self) -> list[DeviceRecord]:
        out = [self.record(c) for c in sorted(self.dirty) if c in self.entries]
        self.dirty.clear()
        return out

    def record(self, client: str) -> DeviceRecord:
        e = self.entries[client]
        return DeviceRecord(self.job, client, e.online, e.last_seen, e.rounds, e.last_receipt, e.last_round, e.info)

    # --- persistence ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        self.changed = False
        # By hand, not dataclasses.asdict (which deep-copies): this runs at every checkpoint, for every device.
        return {"job": self.job, "devices": {
            c: {"online": e.online, "last_seen": e.last_seen, "rounds": e.rounds, "last_receipt": e.last_receipt,
                "last_round": e.last_round, "info": e.info}
            for c, e in self.entries.items()}}

    def load(self, data: dict[str, Any]) -> None:
        """Entries saved by ``to_json``; what is not well formed is skipped
        (the file is ours, but a disk can be damaged)."""
        devices = data.get("devices") if isinstance(data, dict) and data.get("job") == self.job else None
        if not isinstance(devices, dict):
            return
        for client, raw in list(devices.items())[: self.max_devices]:
            try:
                check_id(client, "device id")
                self.entries[client] = DeviceEntry(
                    online=bool(raw["online"]), last_seen=float(raw["last_seen"]), rounds=int(raw["rounds"]),
                    last_receipt=str(raw["last_receipt"])[:200], last_round=int(raw["last_round"]),
                    info=device_info(raw.get("info") or {}))
            except (ValueError, KeyError, TypeError):
                log.warning("fleet.json: skipped the entry of %r (not well formed)", client)
