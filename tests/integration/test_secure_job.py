"""Secure aggregation over a real Mosquitto, with real agents that sign
everything (identity.signing = "required", the default): devices drop out
silently at every stage of the protocol in the same round, and an aggregator
stopped in the middle of a round redoes it with fresh keys. Each round's
model change is checked against the inputs the devices masked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_agent.secure import SecureSession
from fedge import tensors
from fedge.config import updated
from fedge.secagg import flatten

from .support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration

BOUND = 0.5
STEP = BOUND / (2 ** 15 - 1)  # secagg.bits = 16: one step of the stochastic rounding


@pytest.fixture
def inputs(monkeypatch):
    """Each device's input to secure aggregation, by (round, attempt, device)."""
    seen: dict[tuple[int, int, str], np.ndarray] = {}
    original = SecureSession.set_update

    def spy(self, flat, rng, model=None):
        seen[(self.round, self.attempt, self.me)] = np.array(flat)
        return original(self, flat, rng, model)

    monkeypatch.setattr(SecureSession, "set_update", spy)
    return seen


def secure_config(tmp_path, url, rounds, agents, deadline_s=30.0, stage_s=30.0):
    """A stage ends when every device has answered, or at ``stage_s``: a
    long stage costs a test only where a device is silent on purpose."""
    cfg = job_config(tmp_path, url, rounds=rounds, agents=agents)
    return updated(cfg, selection={"deadline_s": deadline_s, "settle_s": 1.0},
                   secagg={"mode": "on", "bound": BOUND, "stage_s": stage_s})


def test_dropouts_at_every_stage_in_one_round_leave_the_exact_mean_of_the_rest(mosquitto, tmp_path, inputs):
    """Nine devices (degree 8, threshold 5): in the round one goes silent
    before its keys, one before its shares, one before its masked input and
    one before revealing. Six inputs are summed; five devices reveal, enough
    to remove the self masks of six and the pairwise masks the one that
    dropped after sharing left behind."""
    # The round closes when the eight devices that can answer have (quorum
    # 8/9: the two that sent no keys or shares count as answered); its
    # deadline is only a bound, long enough for a loaded machine's first
    # training, and the update-dropper is not waited for. The key and share
    # stages wait stage_s for their silent device: long enough for the
    # others to answer on a loaded machine (at 4 s, they once did not).
    cfg = secure_config(tmp_path, mosquitto.url, rounds=1, agents=9, deadline_s=90.0, stage_s=12.0)
    cfg = updated(cfg, selection={"quorum": 8 / 9})
    specs = devices(tmp_path, "itest", 9)
    for i, stage in ((1, "keys"), (2, "shares"), (3, "update"), (4, "reveal")):
        specs[i] = dataclasses.replace(specs[i], dropout=1.0, dropout_stages=(stage,))
    models = []
    with running_fleet(specs, cfg.broker) as fleet, running_aggregator(cfg) as (service, records):
        models.append(dict(service.core.models.exact))
        assert service.done.wait(180), records
        models.append(dict(service.core.models.exact))
        refused = sum(sum(d.refused.values()) for d in fleet.devices.values())
    assert [r["status"] for r in records] == ["ok"], records
    names = tensors.TensorSpec.of(models[0]).names
    for r, record in enumerate(records, start=1):
        sec = record["secagg"]
        assert (sec["stage"], sec["keys"], sec["shared"], sec["inputs"]) == ("done", 8, 7, 6), sec
        assert sec["threshold"] == 5 and sec["degree"] == 8
        assert sorted(record["accepted"]) == ["dev-0", "dev-4", "dev-5", "dev-6", "dev-7", "dev-8"]
        summed = [inputs[(r, 1, d)] for d in record["accepted"]]
        moved = flatten(models[r], names) - flatten(models[r - 1], names)
        assert np.abs(moved - np.mean(summed, axis=0)).max() <= STEP
    assert refused == 0  # every stage message the devices got was signed by the aggregator


def test_an_aggregator_stopped_mid_protocol_redoes_the_round_with_fresh_keys(mosquitto, tmp_path, inputs):
    """The aggregator stops while round 2 is between its key stage and its
    close; the restarted one re-announces round 2 as attempt 2, the devices
    make new keys, mask the update they kept afresh, and the round's result
    is the mean of those inputs. No key of attempt 1 is used again."""
    cfg = secure_config(tmp_path, mosquitto.url, rounds=3, agents=4)
    specs = devices(tmp_path, "itest", 4)
    with running_fleet(specs, cfg.broker):
        with running_aggregator(cfg) as (service, first):
            wait_for(lambda: len(first) >= 1, 90, "round 1")
            core = service.core
            wait_for(lambda: core.secure is not None and core.secure.round == 2 and len(core.secure.server.keys) == 4,
                     60, "round 2's keys")
            keys_1 = set(core.secure.server.keys.values())
            before = dict(core.models.exact)
        with running_aggregator(cfg) as (service, second):
            core = service.core
            wait_for(lambda: core.secure is not None and core.secure.round == 2 and len(core.secure.server.keys) == 4,
                     60, "round 2's keys again")
            keys_2 = set(core.secure.server.keys.values())
            wait_for(lambda: len(second) >= 1, 90, "round 2")
            after = dict(core.models.exact)
            assert service.done.wait(90), second
    assert [r["round"] for r in first] == [1] and [r["round"] for r in second] == [2, 3]
    assert second[0]["attempt"] == 2 and all(r["status"] == "ok" and r["clients"] == 4 for r in second), second
    assert not keys_1 & keys_2  # fresh key pairs for the new attempt
    # Each device masked for attempt 2 the very update it had for attempt 1 (it never trains twice).
    assert all(np.array_equal(inputs[(2, 1, d)], inputs[(2, 2, d)]) for r, a, d in inputs if (r, a) == (2, 1))
    names = tensors.TensorSpec.of(before).names
    summed = [inputs[(2, 2, f"dev-{i}")] for i in range(4)]
    moved = flatten(after, names) - flatten(before, names)
    assert np.abs(moved - np.mean(summed, axis=0)).max() <= STEP
