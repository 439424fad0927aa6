"""The device's state directory: what a restart brings back."""

import numpy as np

from edge_agent.core import AgentState, Pending
from edge_agent.state import StateDir


def test_state_update_residual_and_key_survive_a_restart(tmp_path):
    store = StateDir(tmp_path)
    state = AgentState(last_round=7, pending=Pending(7, "u7", "abc", sent_attempt=1))
    residual = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    store.save(state.to_json(), b"update-bytes")
    store.save_residual(residual)
    store.save_key(b"key-message")

    again = StateDir(tmp_path)
    loaded, update = again.load()
    assert loaded == state and update == b"update-bytes"
    np.testing.assert_array_equal(again.load_residual()["w"], residual["w"])
    assert again.load_residual()["w"].flags.writeable  # the core adds to it
    assert again.load_key() == b"key-message"


def test_clearing_removes_the_files(tmp_path):
    store = StateDir(tmp_path, durable=False)
    store.save(AgentState(last_round=1, pending=Pending(1, "u", "d")).to_json(), b"x")
    store.save_residual({"w": np.ones(2, np.float32)})
    store.save(AgentState(last_round=1).to_json(), None)
    store.save_residual(None)
    assert not store.update_file.exists() and not store.residual_file.exists()
    assert StateDir(tmp_path).load() == (AgentState(last_round=1), None)


def test_an_unreadable_state_file_does_not_brick_the_device(tmp_path):
    (tmp_path / "agent.json").write_text("{not json")
    (tmp_path / "residual.safetensors").write_bytes(b"junk")
    store = StateDir(tmp_path)
    assert store.load() == (AgentState(), None)
    assert store.load_residual() is None


def test_a_simulated_fleet_keeps_one_copy_of_a_key_model_linked_into_each_device(tmp_path, monkeypatch):
    import hashlib
    import os

    message = b"a key model" * 1000
    digest = hashlib.sha256(message).digest()
    blobs = tmp_path / "shared"
    blobs.mkdir()
    a, b = StateDir(tmp_path / "a", durable=False, blobs=blobs), StateDir(tmp_path / "b", durable=False, blobs=blobs)
    a.save_key(message, digest)
    b.save_key(message, digest)
    assert a.load_key() == b.load_key() == message
    assert os.stat(a.key_file).st_ino == os.stat(b.key_file).st_ino == os.stat(blobs / f"{digest.hex()}.key").st_ino
    # Where a link cannot be made (no hard links, an inode's link limit), each device gets a copy.
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(31, "Too many links")))
    c = StateDir(tmp_path / "c", durable=False, blobs=blobs)
    c.save_key(message, digest)
    assert c.load_key() == message and os.stat(c.key_file).st_ino != os.stat(a.key_file).st_ino
