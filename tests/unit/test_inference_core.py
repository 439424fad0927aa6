"""The inference-only device's core: which published artifact to install,
with no files, sockets or ONNX Runtime."""

from __future__ import annotations

import hashlib

from edge_agent.core import Connected, PublishStatus
from edge_agent.inference import ArtifactArrived, ArtifactServed, InferenceCore, InstallArtifact, InstallFailed
from fedge import wire
from fedge.messages import Artifact, Status


def artifact(round_: int, body: bytes = b"onnx-bytes", *, job: str = "job", name: str = "model",
             manifest_sha: str | None = None) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return Artifact(job, round_, name, "onnx", "int8", digest, {"sha256": manifest_sha or digest}, body).encode()


def core() -> InferenceCore:
    return InferenceCore("kiosk-1", "job", "model", {"ram_mb": 1024})


def installs(actions) -> list[int]:
    return [a.artifact.round for a in actions if isinstance(a, InstallArtifact)]


def test_connecting_announces_an_inference_device():
    (action,) = core().handle(Connected(0.0))
    assert isinstance(action, PublishStatus)
    status = Status.parse(wire.decode(action.message))
    assert status.state == "online" and status.info["role"] == "inference" and status.info["ram_mb"] == 1024


def test_newer_artifacts_are_installed_and_older_or_same_ones_are_not():
    c = core()
    assert installs(c.handle(ArtifactArrived(artifact(2, b"v2"), 0.0))) == [2]
    # A QoS 1 redelivery of the artifact being installed is not installed twice.
    assert installs(c.handle(ArtifactArrived(artifact(2, b"v2"), 0.1))) == []
    c.handle(ArtifactServed(2, hashlib.sha256(b"v2").hexdigest()))
    assert installs(c.handle(ArtifactArrived(artifact(2, b"v2"), 0.2))) == []
    assert installs(c.handle(ArtifactArrived(artifact(1, b"v1"), 0.3))) == [], "a late, older retained copy"
    assert installs(c.handle(ArtifactArrived(artifact(4, b"v4"), 0.4))) == [4]


def test_a_failed_install_lets_a_redelivered_copy_try_again():
    c = core()
    assert installs(c.handle(ArtifactArrived(artifact(3, b"v3"), 0.0))) == [3]
    c.handle(InstallFailed(hashlib.sha256(b"v3").hexdigest()))
    assert installs(c.handle(ArtifactArrived(artifact(3, b"v3"), 1.0))) == [3]


def test_what_the_device_served_before_a_restart_is_not_installed_again():
    c = core()
    c.handle(ArtifactServed(5, hashlib.sha256(b"v5").hexdigest()))
    assert installs(c.handle(ArtifactArrived(artifact(5, b"v5"), 0.0))) == []
    assert installs(c.handle(ArtifactArrived(artifact(4, b"v4"), 0.0))) == []


def test_foreign_or_broken_artifacts_are_ignored_and_counted():
    c = core()
    assert installs(c.handle(ArtifactArrived(artifact(2, job="other"), 0.0))) == []
    assert installs(c.handle(ArtifactArrived(artifact(2, name="other"), 0.0))) == []
    assert installs(c.handle(ArtifactArrived(artifact(2, manifest_sha="0" * 64), 0.0))) == []
    assert installs(c.handle(ArtifactArrived(b"garbage", 0.0))) == []
    tampered = bytearray(artifact(2))
    tampered[-1] ^= 1
    assert installs(c.handle(ArtifactArrived(bytes(tampered), 0.0))) == []
    assert c.counters["bad_artifact"] == 3
