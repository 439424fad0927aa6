"""The devices enrolled with a job: who may take part, with which key.

The registry is a JSON file in the job's state directory (``devices.json``),
written atomically by the operator's commands (``fedge enroll``, ``fedge
revoke``) and read by the running aggregator, which notices a change on the
next message it checks: a revocation takes effect then, without a restart.

Each entry: the device id, its public key (``ed25519:...``), when it was
enrolled, and when it was revoked (if it was). A revoked device stays in the
file, so that the record of who was trusted when survives, and so that
enrolling the same id again is a deliberate act (``--replace``): with
another key, or after a revocation. Enrolling an active device with the key
it has changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.errors import OneReasonError
from fedge.files import atomic_write
from fedge.identity import IdentityError, PublicKey
from fedge.topics import check_id

FILE = "devices.json"
FORMAT = 1


class RegistryError(OneReasonError):
    default_reason = "registry"


@dataclass(frozen=True)
class Device:
    id: str
    key: PublicKey
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_text(), "enrolled_at": self.enrolled_at}
        if self.revoked_at is not None:
            out["revoked_at"] = self.revoked_at
        return out


class Registry:
    """The enrolled devices of one job, backed by ``<state_dir>/devices.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE
        self.devices: dict[str, Device] = {}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self.reload()

    # --- reading ---------------------------------------------------------------

    def reload(self) -> bool:
        """Read the file again if it changed since the last read; True if it
        did. A file that cannot be read keeps the devices last read (and
        raises, so the caller can say so)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            changed = self._seen is not None or self.devices != {}
            self.devices, self._seen = {}, None
            return changed
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False
        self.devices = self._parse(self.path.read_bytes())
        self._seen = stamp
        return True

    def _parse(self, data: bytes) -> dict[str, Device]:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("devices"), dict):
                raise ValueError("not a fedge device registry")
            out = {}
            for device_id, entry in doc["devices"].items():
                check_id(device_id, "device id")
                revoked = entry.get("revoked_at")
                out[device_id] = Device(device_id, PublicKey.from_text(entry["key"]), float(entry["enrolled_at"]),
                                        None if revoked is None else float(revoked))
            return out
        except (ValueError, KeyError, TypeError, AttributeError, IdentityError) as exc:
            raise RegistryError(f"{self.path} is damaged ({exc}); restore it from a backup or enroll again") from None

    def key_of(self, device_id: str) -> PublicKey | None:
        """The key of an enrolled, unrevoked device; None otherwise."""
        dev = self.devices.get(device_id)
        return dev.key if dev is not None and dev.active else None

    def active(self) -> list[Device]:
        return [d for d in self.devices.values() if d.active]

    # --- the operator's commands -------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One operator command at a time (two enrollments at once would
        otherwise each write the file without the other's device)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._seen = None
                self.reload()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def enroll(self, device_id: str, key: PublicKey, *, replace: bool = False) -> Device:
        try:
            check_id(device_id, "device id")
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        with self._locked():
            return self._enroll(device_id, key, replace)

    def _enroll(self, device_id: str, key: PublicKey, replace: bool) -> Device:
        old = self.devices.get(device_id)
        if old is not None and old.active and old.key == key:
            return old  # enrolled with this very key already: nothing to change, nothing to replace
        return self._enroll_all([(device_id, key)], replace)[0][0]

    def enroll_many(self, entries: Iterable[tuple[str, PublicKey]], *, replace: bool = False
                    ) -> tuple[list[Device], list[Device]]:
        """Enroll a fleet in one write: all of ``entries`` or, on the first
        that cannot be (an id twice, a key shared, an enrolled device without
        ``replace``), none, raising ``RegistryError`` naming it. Returns
        (the devices enrolled, those enrolled with that very key already).
        O(N): one read, one key index, one write, however many devices."""
        items = list(entries)
        for device_id, _ in items:
            try:
                check_id(device_id, "device id")
            except ValueError as exc:
                raise RegistryError(str(exc)) from None
        with self._locked():
            return self._enroll_all(items, replace)

    def _enroll_all(self, items: list[tuple[str, PublicKey]], replace: bool) -> tuple[list[Device], list[Device]]:
        owner = {d.key: d.id for d in self.devices.values() if d.active}  # every active key's device
        if replace:  # the keys of devices given new ones are free for others of the batch (a swap)
            for device_id, key in items:
                old = self.devices.get(device_id)
                if old is not None and old.active and old.key != key and owner.get(old.key) == device_id:
                    del owner[old.key]
        seen: set[str] = set()
        now = round(time.time(), 3)
        new: dict[str, Device] = {}
        unchanged: list[Device] = []
        for device_id, key in items:
            if device_id in seen:
                raise RegistryError(f"{device_id} is listed twice; enroll each device once")
            seen.add(device_id)
            old = self.devices.get(device_id)
            if old is not None and old.active and old.key == key:
                unchanged.append(old)  # enrolled with this very key already: nothing to change
                continue
            if old is not None and not replace:
                state = "revoked" if not old.active else "enrolled"
                raise RegistryError(f"{device_id} is already {state} (key {old.key.fingerprint}); "
                                    "pass --replace to give it a new key")
            holder = owner.get(key)
            if holder is not None and holder != device_id:
                raise RegistryError(f"the key given for {device_id} is already enrolled as {holder}; every device "
                                    "needs its own key")
            owner[key] = device_id
            new[device_id] = Device(device_id, key, now)
        if new:
            self._write({**self.devices, **new})
        return [self.devices[d] for d in new], unchanged

    def revoke(self, device_id: str) -> Device:
        with self._locked():
            return self._revoke(device_id)

    def _revoke(self, device_id: str) -> Device:
        dev = self.devices.get(device_id)
        if dev is None:
            raise RegistryError(f"{device_id} is not enrolled; `fedge devices` lists who is")
        if not dev.active:
            return dev
        revoked = Device(dev.id, dev.key, dev.enrolled_at, round(time.time(), 3))
        self._write({**self.devices, device_id: revoked})
        return revoked

    def _write(self, devices: dict[str, Device]) -> None:
        doc = {"format": FORMAT, "devices": {k: v.to_json() for k, v in sorted(devices.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, (json.dumps(doc, indent=2) + "\n").encode(), True)
        self._seen = None
        self.reload()
