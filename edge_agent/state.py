"""The device's state directory: what lets an agent restart at any moment
without training twice or sending two different updates for one round.

``agent.json`` holds ``AgentState`` (the recent rounds handled, each with
the model it was trained from, and the pending update's identity);
``pending.update`` holds the pending update's exact bytes so a resend after
a restart is byte-identical; ``residual.safetensors`` the error-feedback
memory; ``key.fedge`` the latest key model, so a restart does not download
it again; ``identity.json`` the numbers signing keeps (``load_identity``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edge_agent.core import AgentState
from fedge import tensors
from fedge.files import atomic_write, writable_dir
from fedge.tensors import ModelArrays

log = logging.getLogger("fedge.agent")


class StateDir:
    """The device's state directory (the aggregator's twin is
    ``aggregator.state.StateDir``); ``durable=False`` skips the fsyncs for
    simulated fleets that share one disk."""

    def __init__(self, root: str | Path, durable: bool = True, blobs: Path | None = None) -> None:
        self.root = Path(root)
        self.durable = durable
        # A simulated fleet's store of files many devices hold the same
        # bytes of (the key model), linked into each state directory.
        self.blobs = blobs
        self._written_update: bytes | None = None
        writable_dir(self.root, "agent.state_dir")  # one ConfigError line, before the device starts
        self.state_file = self.root / "agent.json"
        self.update_file = self.root / "pending.update"
        self.residual_file = self.root / "residual.safetensors"
        self.key_file = self.root / "key.fedge"
        self.identity_file = self.root / "identity.json"
        self._identity: dict | None = None

    def load(self) -> tuple[AgentState, bytes | None]:
        if not self.state_file.exists():
            return AgentState(), None
        try:
            state = AgentState.from_json(json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            # Unreadable state must not brick a device; start clean but never
            # below the round it names, if that much can be read.
            log.error("state file %s is unreadable (%s); starting with empty state", self.state_file, exc)
            return AgentState(), None
        update = self.update_file.read_bytes() if state.pending and self.update_file.exists() else None
        self._written_update = update
        return state, update

    def save(self, state: dict, update: bytes | None) -> None:
        # The update's bytes change once a round; receipts only touch the state.
        if update is not None and update is not self._written_update:
            atomic_write(self.update_file, update, self.durable)
            self._written_update = update
        atomic_write(self.state_file, json.dumps(state).encode(), self.durable)
        if update is None and self.update_file.exists():
            self.update_file.unlink()
            self._written_update = None

    def load_identity(self) -> dict:
        """Numbers signing keeps (``identity.json``): the last presence
        sequence number used and the newest announcement's taken."""
        if self._identity is None:
            try:
                loaded = json.loads(self.identity_file.read_text())
                self._identity = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._identity = {}
        return dict(self._identity)

    def save_identity(self, numbers: dict) -> None:
        atomic_write(self.identity_file, json.dumps(numbers).encode(), self.durable)
        self._identity = dict(numbers)

    def save_residual(self, residual: ModelArrays | None) -> None:
        if residual is None:
            self.residual_file.unlink(missing_ok=True)
        else:
            atomic_write(self.residual_file, tensors.pack(residual), self.durable)

    def load_residual(self) -> ModelArrays | None:
        if not self.residual_file.exists():
            return None
        try:
            return {k: v.copy() for k, v in tensors.unpack(self.residual_file.read_bytes()).items()}
        except (OSError, tensors.TensorError) as exc:
            log.error("residual %s is unreadable (%s); starting error feedback afresh", self.residual_file, exc)
            return None

    def save_key(self, message: bytes, digest: bytes = b"") -> None:
        """``digest`` (the message's sha256), with ``blobs``: the file is a
        hard link to the one copy of these bytes (written once)."""
        if self.blobs is None or len(digest) != 32:
            atomic_write(self.key_file, message, self.durable)
            return
        blob = self.blobs / f"{digest.hex()}.key"
        if not blob.exists():
            atomic_write(blob, message, self.durable)
        temp = self.key_file.with_name(self.key_file.name + ".link")
        try:
            temp.unlink(missing_ok=True)
            os.link(blob, temp)
            os.replace(temp, self.key_file)
        except OSError:  # a file system without hard links, or one inode's link limit reached: a copy
            atomic_write(self.key_file, message, self.durable)

    def load_key(self) -> bytes | None:
        try:
            return self.key_file.read_bytes()
        except OSError:
            return None
