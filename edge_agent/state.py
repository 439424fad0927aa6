"""The device's state directory: what lets an agent restart at any moment
without training twice or sending two different updates for one round.

``agent.json`` holds ``AgentState`` (last round handled, the pending
update's identity); ``pending.update`` holds the pending update's exact
bytes so a resend after a restart is byte-identical.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edge_agent.core import AgentState
from fedge.files import atomic_write

log = logging.getLogger("fedge.agent")


class DeviceStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "agent.json"
        self.update_file = self.root / "pending.update"

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
        return state, update

    def save(self, state: dict, update: bytes | None) -> None:
        if update is not None:
            atomic_write(self.update_file, update)
        atomic_write(self.state_file, json.dumps(state).encode())
        if update is None and self.update_file.exists():
            self.update_file.unlink()
