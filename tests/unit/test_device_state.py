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
