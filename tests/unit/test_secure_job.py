"""Securely aggregated jobs with real training, on the in-memory transport:
the aggregator's round machinery with SecureRound, the agents with
SecureSession, every stage message through the shells. The sum the
aggregator unmasks is checked against the devices' own inputs, and devices
drop out silently at each stage. (The same over a real Mosquitto:
tests/integration/test_secure_job.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.privacy import adaptive_noise_multiplier
from edge_agent.pool import TrainingPool
from edge_agent.secure import SecureSession
from fedge import tensors
from fedge.config import ConfigError, updated
from fedge.secagg import SecAggPlan, flatten, quantize
from fedge.transport import MemoryBroker

from .builders import devices, job, job_and_fleet, wait_for

BOUND = 0.5


def secure_job(tmp, n: int, rounds: int, deadline_s: float = 60.0, **secagg: object) -> AggregatorConfig:
    return updated(job(tmp, min_clients=n, deadline_s=deadline_s), job={"rounds": rounds},
                   training={"epochs": 1, "batch_size": 32, "lr": 0.1},
                   evaluate={"data": "fedge.datasets:digits", "args": {"split": "test"}},
                   secagg={"mode": "on", "bound": BOUND, "stage_s": 5.0, **secagg})


@pytest.fixture
def inputs(monkeypatch):
    """What each device hands secure aggregation, by (round, attempt, device): its clipped update, flat."""
    seen: dict[tuple[int, int, str], np.ndarray] = {}
    original = SecureSession.set_update

    def spy(self, flat, rng, model=None):
        seen[(self.round, self.attempt, self.me)] = np.array(flat)
        return original(self, flat, rng, model)

    monkeypatch.setattr(SecureSession, "set_update", spy)
    return seen


def test_a_secure_job_trains_and_each_round_is_the_mean_of_the_devices_inputs(tmp_path, inputs):
    cfg = secure_job(tmp_path, 4, 3)
    models: dict[int, dict[str, np.ndarray]] = {}
    records = []

    def on_record(record):
        records.append(record)

    with job_and_fleet(cfg, MemoryBroker(), devices(tmp_path, 4), TrainingPool(size=1, mode="warm", threads=1),
                       on_record=on_record) as (service, _):
        models[0] = dict(service.core.models.exact)
        for r in (1, 2, 3):
            wait_for(lambda r=r: len(records) >= r, 120)
            models[r] = dict(service.core.models.exact)
        assert service.done.wait(30)
        counters = dict(service.core.counters)
    assert [r.status for r in records] == ["ok"] * 3, [(r.status, r.failure, r.extra) for r in records]
    assert all(r.clients == 4 and r.extra["secagg"]["stage"] == "done" for r in records)
    assert records[-1].accuracy > records[0].accuracy, [r.accuracy for r in records]
    benign = ("secagg_late", "secagg_stale_attempt")  # a reveal after unmasking had enough
    assert not any(k.startswith("secagg_") and k not in benign for k in counters), counters
    spec = tensors.TensorSpec.of(models[0])
    for r in (1, 2, 3):
        # FedAvg at server lr 1 with uniform weights: the model moved by the
        # mean of the four inputs, up to the stochastic rounding to 16 bits.
        mine = [flat for (rnd, _, _), flat in inputs.items() if rnd == r]
        assert len(mine) == 4
        moved = flatten(models[r], spec.names) - flatten(models[r - 1], spec.names)
        step = BOUND / (2 ** 15 - 1)
        assert np.abs(moved - np.mean(mine, axis=0)).max() <= step  # rounding error is at most 1 step per device
        assert np.abs(np.mean(mine, axis=0)).max() > 100 * step  # and the update is far larger than that


@pytest.mark.parametrize("stage", ["keys", "shares", "update", "reveal"])
def test_a_device_that_drops_out_at_any_stage_leaves_the_exact_sum_of_the_others(tmp_path, inputs, stage):
    """One of five devices goes silent in round 1 at ``stage``: before its
    keys or its shares (it is left out of the masks), before its masked
    input (its pairwise masks are rebuilt from its neighbours' shares), or
    before revealing (its own input still counts: the others' shares
    suffice). The round is the mean of what was summed, exactly."""
    # Bounds, not durations, long enough for a loaded machine: a stage waits
    # stage_s only for its silent device; a device silent before its input
    # is not awaited (quorum 4 of 5: every other device has answered then).
    cfg = secure_job(tmp_path, 5, 1, deadline_s=90.0, stage_s=12.0)
    if stage == "update":
        cfg = updated(cfg, selection={"quorum": 0.8})
    specs = devices(tmp_path, 5)
    specs[2] = dataclasses.replace(specs[2], dropout=1.0, dropout_stages=(stage,))
    records = []
    with job_and_fleet(cfg, MemoryBroker(), specs, TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, _):
        before = dict(service.core.models.exact)
        assert service.done.wait(240), records
        after = dict(service.core.models.exact)
    (record,) = records
    assert record.status == "ok", (record.failure, record.extra)
    summed = {"keys": 4, "shares": 4, "update": 4, "reveal": 5}[stage]
    assert record.clients == summed and record.extra["secagg"]["inputs"] == summed, record.extra
    names = tensors.TensorSpec.of(before).names
    used = [flat for (_, _, dev), flat in inputs.items() if dev != "dev-2" or stage == "reveal"]
    moved = flatten(after, names) - flatten(before, names)
    assert np.abs(moved - np.mean(used, axis=0)).max() <= BOUND / (2 ** 15 - 1)


def test_too_few_devices_left_fail_the_round_and_reveal_nothing(tmp_path):
    """Three devices, threshold 2 of 2 neighbours: two go silent before
    their shares, so the one left cannot be unmasked alone. The round fails,
    the model stays, and the job goes on to the next round."""
    cfg = secure_job(tmp_path, 3, 2)
    specs = [dataclasses.replace(s, dropout=1.0, dropout_stages=("shares",)) if s.client_id != "dev-2" else s
             for s in devices(tmp_path, 3)]
    records = []
    with job_and_fleet(cfg, MemoryBroker(), specs, TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, _):
        before = dict(service.core.models.exact)
        wait_for(lambda: len(records) >= 1, 60)
        first = dict(service.core.models.exact)
    assert records[0].status == "failed" and records[0].failure == "secagg_failed", records[0]
    assert records[0].extra["secagg"]["stage"] == "failed"
    assert all(np.array_equal(before[k], first[k]) for k in before)


def test_the_plan_holds_the_sum_of_every_selected_device_without_wrapping():
    """The modulus is sized for the selection: n inputs at the clamp's
    extreme sum exactly, in both directions."""
    from aggregator.secure import SecAggPolicy
    from fedge.secagg import dequantize

    for n in (3, 10, 300):
        plan: SecAggPlan = SecAggPolicy(bits=16, bound=BOUND).plan(n, 0.0)
        assert plan.capacity() >= n
        for sign in (1.0, -1.0):
            one = quantize(np.full(7, sign * 10 * BOUND), plan, np.random.default_rng(0))  # clamped to the bound
            total = np.zeros(7, dtype=np.uint32)
            for _ in range(n):
                total = (total + one) & np.uint32(plan.mask)
            assert np.allclose(dequantize(total, plan), sign * n * BOUND, rtol=1e-6)


def test_secure_aggregation_config_is_checked():
    base = AggregatorConfig()
    with pytest.raises(ConfigError, match=r"secagg\.bound"):
        updated(base, secagg={"mode": "on"}, selection={"min_clients": 3}).check()
    with pytest.raises(ConfigError, match="min_clients >= 3"):
        updated(base, secagg={"mode": "on", "bound": 0.1}).check()
    with pytest.raises(ConfigError, match=r"server\.aggregation"):
        updated(base, secagg={"mode": "on", "bound": 0.1}, selection={"min_clients": 3, "max_clients": 5},
                server={"aggregation": "median"}).check()
    with pytest.raises(ConfigError, match="leave it 0, the privacy clip"):
        updated(base, secagg={"mode": "on", "bound": 0.1}, selection={"min_clients": 3},
                privacy={"mode": "central", "min_devices": 30}).check()
    updated(base, secagg={"mode": "on"}, selection={"min_clients": 3},
            privacy={"mode": "central", "min_devices": 30}).check()
    # Distributed noise goes in integers with secure aggregation: no float32 uplink needed.
    updated(base, secagg={"mode": "on"}, selection={"min_clients": 3},
            privacy={"mode": "distributed", "min_devices": 30}).check()


def test_distributed_noise_in_integers_gives_the_release_exactly_the_noise_it_accounts_for(tmp_path, inputs):
    """Distributed privacy under secure aggregation (DDGauss): each of four
    devices clips its update, rounds it within the conditional-rounding
    bound and adds a discrete Gaussian share; the aggregator unmasks the sum
    and adds nothing when every expected device is in it. The released
    change, times the denominator, minus the devices' clipped inputs is the
    noise alone: its deviation is z x clip (times the rounding bound's
    1 + 1e-4), within sampling error over the model's 4,810 coordinates."""
    clip, z = 0.5, 0.8
    cfg = updated(job(tmp_path, min_clients=4, deadline_s=60.0), job={"rounds": 2},
                  training={"epochs": 1, "batch_size": 32, "lr": 0.1},
                  privacy={"mode": "distributed", "clip": clip, "noise_multiplier": z, "sampling_rate": 1.0,
                           "delta": 1e-3, "clip_quantile": 0.5, "clip_bit_noise": 2.0},
                  secagg={"mode": "on", "stage_s": 5.0}, server={"clip": "off", "direction": "off"})
    records, models = [], []
    with job_and_fleet(cfg, MemoryBroker(), devices(tmp_path, 4), TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, _):
        models.append(dict(service.core.models.exact))
        wait_for(lambda: len(records) >= 1, 120)
        models.append(dict(service.core.models.exact))
        assert service.done.wait(60)
    first = records[0]
    assert first.status == "ok" and first.extra["dp_noise_shares"] == 4 == first.clients, first
    assert first.extra["secagg"]["ddgauss_tau"] < 1e-30
    # The aggregator saw only the sum, with all of its noise: no worse off than anyone who sees the model.
    assert first.extra["epsilon_aggregator"] == first.extra["epsilon_participant"]
    names = tensors.TensorSpec.of(models[0]).names
    n = len(flatten(models[0], names))
    mine = [flat for (r, _, _), flat in inputs.items() if r == 1]
    assert len(mine) == 4 and all(len(f) == n + 1 for f in mine)  # the model, and the clip report
    assert all(np.linalg.norm(f[:n]) <= clip * (1 + 1e-6) for f in mine)
    noise = (flatten(models[1], names) - flatten(models[0], names)) * 4 - np.sum(mine, axis=0)[:n]
    want = adaptive_noise_multiplier(z, 2.0) * clip  # adaptive clipping's report takes its part of z
    assert abs(noise.mean()) < 4 * want / np.sqrt(n)
    assert noise.std() == pytest.approx(want, rel=0.05), (noise.std(), want)
