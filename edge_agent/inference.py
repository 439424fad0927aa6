"""The inference-only device's protocol core: which published ONNX artifact to
install. No I/O; the runtime writes files and loads ONNX Runtime.

An artifact is installed only when its envelope digest, its file's sha256
and its manifest agree (``Artifact.parse`` checks all three), it belongs to
this job and name, and it is newer than what the device already serves; an
older retained copy arriving late is ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edge_agent.core import Connected, PublishStatus
from fedge import wire
from fedge.messages import Artifact, ProtocolError, Status
from fedge.wire import WireError

log = logging.getLogger("fedge.agent")


@dataclass(frozen=True)
class ArtifactArrived:
    message: bytes
    now: float


@dataclass(frozen=True)
class InstallArtifact:
    artifact: Artifact


@dataclass
class InferenceCore:
    client_id: str
    job: str
    name: str
    info: dict[str, Any]
    installed_round: int = -1
    installed_sha256: str = ""
    counters: dict[str, int] = field(default_factory=dict)

    def status(self, state: str) -> bytes:
        return Status(self.client_id, state, {**self.info, "role": "inference"} if state == "online" else {}).encode()

    def handle(self, event: object) -> list[Any]:
        if isinstance(event, Connected):
            return [PublishStatus(self.status("online"))]
        if isinstance(event, ArtifactArrived):
            return self._on_artifact(event.message)
        return []

    def _on_artifact(self, message: bytes) -> list[Any]:
        try:
            art = Artifact.parse(wire.decode(message))
        except (WireError, ProtocolError) as exc:
            self.counters["bad_artifact"] = self.counters.get("bad_artifact", 0) + 1
            log.warning("%s: ignored an artifact: %s", self.client_id, exc)
            return []
        if art.job != self.job or art.name != self.name or art.format != "onnx":
            return []
        if art.round < self.installed_round or art.sha256 == self.installed_sha256:
            return []
        self.installed_round, self.installed_sha256 = art.round, art.sha256
        return [InstallArtifact(art)]
