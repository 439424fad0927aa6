"""The aggregator's own key: made or loaded at start (and rotated, when
``fedge keys rotate`` left a successor), the key chain devices follow
across rotations, and what the key signs.

With ``identity.signing = "off"`` there is no key: nothing is signed, and
any client of the broker is believed (a warning says so at start).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.state import StateDir
from fedge import wire
from fedge.config import ConfigError
from fedge.identity import Identity, IdentityError, next_key_path, sign_link
from fedge.messages import KeyChain, KeyLink

log = logging.getLogger("fedge.aggregator")

IDENTITY_FILE = "identity.json"  # in the state directory: the key chain and the announcements' sequence


class AggregatorKeys:
    def __init__(self, cfg: AggregatorConfig, state: StateDir) -> None:
        self.job = cfg.job.name
        self.state = state
        # Announcements carry it: a device tells this run's from an earlier one's.
        self.session = uuid.uuid4().hex[:16]
        self.identity = self._load(cfg)

    def _load(self, cfg: AggregatorConfig) -> Identity | None:
        if cfg.identity.signing != "required":
            log.warning("identity.signing = \"off\": messages are not signed and any client of the broker is "
                        "believed; set it to \"required\" and enroll devices (fedge enroll)")
            return None
        path = Path(cfg.identity.key_file) if cfg.identity.key_file else self.state.root / "aggregator.key"
        try:
            nxt = next_key_path(path)
            if not path.exists() and nxt.exists():  # a rotation stopped between its two renames
                os.replace(nxt, path)
            if not path.exists() and not cfg.identity.key_file:
                Identity.generate().save(path)
                log.info("made the aggregator's key pair in %s", path)
            identity = Identity.load(path)
            if nxt.exists():
                identity = self._rotate(path, identity, Identity.load(nxt))
        except (IdentityError, OSError) as exc:
            raise ConfigError(f"identity.key_file: {exc}") from None
        log.info("aggregator key %s: devices pin it as identity.aggregator_key", identity.public.to_text())
        return identity

    def _rotate(self, path: Path, old: Identity, new: Identity) -> Identity:
        """Hand the job over from ``old`` to ``new`` (``fedge keys rotate``
        left it in ``<key>.next``): the old key signs the new into the key
        chain (persisted first), then the files move. Devices that pinned
        any earlier key follow the chain (``KeyChain``, retained)."""
        stored = self.state.load_json(IDENTITY_FILE)
        chain = [list(link) for link in stored.get("chain", [])]
        if not chain or chain[-1][1] != new.public.to_text():
            chain.append(list(sign_link(self.job, old, new.public)))
            self.state.save_json(IDENTITY_FILE, {**stored, "chain": chain})
        retired = path.with_name(f"{path.name}.{old.public.fingerprint}.retired")
        os.replace(path, retired)
        os.replace(next_key_path(path), path)
        log.warning("rotated the aggregator's key: %s signed its successor %s (the old key is in %s)",
                    old.public.fingerprint, new.public.to_text(), retired)
        return new

    def key_chain(self) -> bytes | None:
        """The retained key chain, signed by the current key (None: never rotated)."""
        links = self.state.load_json(IDENTITY_FILE).get("chain", [])
        if self.identity is None or not links:
            return None
        chain = KeyChain(self.job, tuple(KeyLink(*link) for link in links))
        return self.seal(chain.encode())

    def seal(self, message: bytes) -> bytes:
        """``message`` signed by the aggregator (as it is when signing is off)."""
        return message if self.identity is None else wire.seal(message, self.identity)

    def stamped(self, announcement: bytes) -> bytes:
        """An announcement with this aggregator's session and a sequence number
        that only grows, across restarts too (persisted before it is used):
        devices refuse a signed announcement older than the newest they saw."""
        if self.identity is None:
            return announcement
        env = wire.decode(announcement)
        stored = self.state.load_json(IDENTITY_FILE)
        seq = max(int(stored.get("seq", 0)) + 1, int(time.time() * 1000))
        self.state.save_json(IDENTITY_FILE, {**stored, "seq": seq})
        return wire.encode(env.kind, {**env.header, "session": self.session, "seq": seq}, env.body)
