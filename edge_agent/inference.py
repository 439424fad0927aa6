"""The inference-only device's protocol core: which published ONNX artifact to
install. No I/O; the runtime writes files and loads ONNX Runtime.

An artifact is installed only when its envelope digest, its file's sha256
and its manifest agree (``Artifact.parse`` checks all three), it belongs to
this job and name, and it is newer than what the device already serves; an
older retained copy arriving late is ignored, and so is a copy of the one
being installed. The shell reports what it serves (``ArtifactServed``, also
for the copy it finds on disk at start) or that an install failed
(``InstallFailed``, after which a redelivered copy may try again).
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
class ArtifactServed:
    """The shell serves this artifact (just installed, or found on disk at start)."""

    round: int
    sha256: str


@dataclass(frozen=True)
class InstallFailed:
    """The shell could not serve the artifact it was asked to install."""

    sha256: str


InferenceEvent = Connected | ArtifactArrived | ArtifactServed | InstallFailed


@dataclass(frozen=True)
class InstallArtifact:
    artifact: Artifact


InferenceAction = PublishStatus | InstallArtifact


@dataclass
class InferenceCore:
    client_id: str
    job: str
    name: str
    info: dict[str, Any]
    served_round: int = -1
    served_sha256: str = ""
    installing: str = ""  # sha256 of the artifact handed to the shell, until it reports back
    counters: dict[str, int] = field(default_factory=dict)

    def status(self, state: str) -> bytes:
        return Status(self.client_id, state, {**self.info, "role": "inference"} if state == "online" else {}).encode()

    def handle(self, event: InferenceEvent) -> list[InferenceAction]:
        if isinstance(event, Connected):
            return [PublishStatus(self.status("online"))]
        if isinstance(event, ArtifactArrived):
            return self._on_artifact(event.message)
        if isinstance(event, ArtifactServed):
            self.served_round, self.served_sha256 = event.round, event.sha256
            self.installing = ""
        elif isinstance(event, InstallFailed) and event.sha256 == self.installing:
            self.installing = ""  # not serving it: a redelivered copy may try again
        return []

    def _on_artifact(self, message: bytes) -> list[InferenceAction]:
        try:
            art = Artifact.parse(wire.decode(message))
        except (WireError, ProtocolError) as exc:
            self.counters["bad_artifact"] = self.counters.get("bad_artifact", 0) + 1
            log.warning("%s: ignored an artifact: %s", self.client_id, exc)
            return []
        if art.job != self.job or art.name != self.name or art.format != "onnx":
            return []
        if art.round < self.served_round or art.sha256 in (self.served_sha256, self.installing):
            return []
        self.installing = art.sha256
        return [InstallArtifact(art)]
