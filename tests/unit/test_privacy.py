"""Client-level differential privacy: the accountant against dp-accounting,
Poisson selection, clipping, the noise's standard deviation, the budget, and
the accountant's state across a restart."""

import dataclasses

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from aggregator.config import AggregatorConfig
from aggregator.privacy import DpPolicy, PrivacySpec, adaptive_noise_multiplier, epsilon, rounds_within
from aggregator.robust import Defences, DpRound, RoundAggregate
from aggregator.rounds import TimerFired
from aggregator.selection import poisson
from fedge import config
from fedge.codecs import make_codec
from fedge.config import ConfigError
from fedge.messages import RoundAnnouncement
from fedge.privacy import DpPlan, add_noise, clip_update
from fedge.tensors import TensorSpec, l2_norm
from tests.unit.test_rounds import announcement, finished, make_core, online, send, update

SHAPES = {"a": (50, 40), "b": (40,)}
SPEC = TensorSpec(tuple(SHAPES.items()))
NONE = make_codec("none")
rng = np.random.default_rng(11)


def reference_epsilon(z, q, rounds, delta, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant,expected", [("rdp", 7.9), ("pld", 7.0)])
def test_reported_epsilon_is_what_dp_accounting_gives(accountant, expected):
    spec = PrivacySpec(1.0, 0.1, 1e-5, accountant)
    assert epsilon(spec, 100) == pytest.approx(reference_epsilon(1.0, 0.1, 100, 1e-5, accountant), rel=1e-9)
    assert epsilon(spec, 100) == pytest.approx(expected, abs=0.06)  # the figures
    assert epsilon(spec, 0) == 0.0


def test_rounds_within_a_budget_is_the_last_round_that_fits():
    spec = PrivacySpec(1.0, 0.1, 1e-5)
    n = rounds_within(spec, 8.0)
    assert epsilon(spec, n) <= 8.0 < epsilon(spec, n + 1)
    assert rounds_within(spec, 0.01) == 0


def test_adaptive_clippings_bit_query_leaves_the_model_query_a_larger_multiplier():
    z_delta = adaptive_noise_multiplier(1.0, 10.0)
    assert z_delta > 1.0 and (z_delta ** -2 + (2 * 10.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        adaptive_noise_multiplier(1.0, 0.4)


# --- selection -------------------------------------------------------------------


def test_poisson_selection_includes_each_device_with_probability_q():
    devices = [f"d{i:03d}" for i in range(200)]
    counts = np.zeros(len(devices))
    sizes = []
    for r in range(1, 501):
        picked = poisson(devices, rate=0.1, seed=3, round_=r)
        sizes.append(len(picked))
        for c in picked:
            counts[devices.index(c)] += 1
    assert poisson(devices, rate=0.1, seed=3, round_=7) == poisson(devices, rate=0.1, seed=3, round_=7)
    # 100,000 Bernoulli(0.1) draws: the overall rate within 4 standard deviations
    assert abs(counts.sum() / 100_000 - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 100_000)
    # the size varies as Binomial(200, 0.1) does (variance 18), not fixed
    assert 12 < np.var(sizes) < 26
    assert any(poisson(devices[:3], rate=0.1, seed=3, round_=r) == () for r in range(1, 20))  # may be empty


# --- the mechanism ---------------------------------------------------------------


def rand(scale=1.0):
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def flat(arrays):
    return np.concatenate([arrays[k].reshape(-1) for k in SHAPES])


def test_clipping_bounds_every_devices_contribution_and_the_divisor_is_fixed():
    deltas = [rand(), rand(100.0), rand(0.001)]
    agg = RoundAggregate(SPEC, NONE, Defences(direction="off"))
    agg.reset((), (), None, DpRound(clip=1.0, noise_std=0.0, denominator=4.0))
    for i, d in enumerate(deltas):
        agg.admit(f"c{i}", NONE.encode(d, rng), 10**6)  # the sample count buys nothing
    out = agg.combine()
    ref = sum(flat(d) * min(1.0, 1.0 / np.linalg.norm(flat(d))) for d in deltas) / 4.0
    np.testing.assert_allclose(flat(out.delta), ref, rtol=1e-5, atol=1e-7)
    assert out.clipped == 2 and out.bound == 1.0


def test_the_noise_has_the_stated_standard_deviation():
    agg = RoundAggregate(SPEC, NONE, Defences(direction="off"))
    agg.reset((), (), None, DpRound(clip=1.0, noise_std=0.5, denominator=1.0))
    noise = flat(agg.combine().delta)  # nobody sampled: the release is the noise alone
    n = noise.size
    assert abs(noise.mean()) < 4 * 0.5 / np.sqrt(n)
    # the sample variance of n normals has relative standard deviation sqrt(2 / n)
    assert abs(noise.var() / 0.25 - 1) < 4 * np.sqrt(2 / n)
    again = RoundAggregate(SPEC, NONE, Defences(direction="off"))
    again.reset((), (), None, DpRound(clip=1.0, noise_std=0.5, denominator=1.0))
    assert not np.array_equal(flat(again.combine().delta), noise)  # fresh noise, never a job's seed


def test_a_device_clips_before_compression_and_adds_its_share():
    big = rand(10.0)
    clipped, was = clip_update(big, 2.0)
    assert was and l2_norm(clipped) == pytest.approx(2.0, rel=1e-5)
    tiny = rand(0.001)
    small, was = clip_update(tiny, 2.0)
    assert not was and np.array_equal(flat(small), flat(tiny))
    noisy = add_noise({"x": np.zeros(40_000, np.float32)}, 0.3, np.random.default_rng(0))["x"]
    assert abs(noisy.std() / 0.3 - 1) < 0.02
    plan = DpPlan(1.5, "central", 0.0)
    assert DpPlan.from_json(plan.to_json()) == plan
    for bad in ({"clip": -1, "noise": "central"}, {"clip": 1, "noise": "loud"}, {"clip": True, "noise": "central"},
                "x", {"clip": 1, "noise": "central", "noise_std": float("nan")}):
        with pytest.raises(ValueError):
            DpPlan.from_json(bad)


# --- the core --------------------------------------------------------------------


def dp_core(target=0.0, rate=1.0, rounds=5):
    policy = DpPolicy(PrivacySpec(1.0, rate, 1e-5), clip=0.5, target_epsilon=target)
    return make_core(privacy=policy, rounds=rounds, defences=Defences(direction="off"))


def run_round(core, clients, now):
    """Bring ``clients`` online, let the next round open, answer it; returns
    its announcement and the actions up to its close (nobody sampled: its
    deadline closes it)."""
    actions = online(core, *clients, now=now) + core.handle(TimerFired(now))
    ann = announcement(actions)
    out = list(actions)
    if ann is None or ann.state != "open":
        return ann, out
    for c in ann.selected:
        out += send(core, c, update(core, c, samples=7), now=now)
    if not ann.selected:
        out += core.handle(TimerFired(now + 1000.0))  # past its deadline
    return ann, out[:next((i for i, a in enumerate(out) if a in finished(out)), len(out)) + 1]


def test_private_rounds_announce_the_clip_and_record_epsilon():
    core = dp_core()
    ann, actions = run_round(core, ["a", "b", "c"], 0.0)
    assert ann.dp == DpPlan(0.5, "central", 0.0)
    [fin] = finished(actions)
    rec = fin.record.to_json()
    assert rec["status"] == "ok" and rec["dp_rounds"] == 1
    assert rec["epsilon"] == pytest.approx(epsilon(PrivacySpec(1.0, 1.0, 1e-5), 1), abs=1e-4)
    assert rec["delta"] == 1e-5 and rec["noise_multiplier"] == 1.0 and rec["sampling_rate"] == 1.0


def test_a_budget_stops_the_job_before_the_round_that_would_exceed_it():
    spec = PrivacySpec(1.0, 1.0, 1e-5)
    target = (epsilon(spec, 2) + epsilon(spec, 3)) / 2  # two rounds fit, the third does not
    core = dp_core(target=target, rounds=10)
    fins = []
    for r in range(4):
        _, actions = run_round(core, ["a", "b"], 2000.0 * r)
        fins += finished(actions)
    assert [f.record.round for f in fins] == [1, 2] and core.state == "done" and core.counters["budget_stop"] == 1
    assert fins[-1].record.extra["epsilon"] <= target
    assert fins[-1].last  # the service stops on it, as on a job's last round


def test_a_restart_gives_the_same_epsilon_and_a_redone_round_is_not_counted_twice():
    core = dp_core()
    run_round(core, ["a", "b"], 0.0)
    arrays, meta = core.snapshot()
    # the aggregator dies after this checkpoint, during round 2; round 2 is redone
    again = dp_core()
    again.restore(arrays, meta, {"round": 2, "attempt": 1, "selected": ["a", "b"],
                                 "model_digest": core.model_digest})
    assert again.dp_rounds == 1
    _, actions = run_round(again, ["a", "b"], 5000.0)
    [fin] = finished(actions)
    assert fin.record.round == 2 and fin.record.extra["dp_rounds"] == 2
    assert fin.record.extra["epsilon"] == pytest.approx(epsilon(PrivacySpec(1.0, 1.0, 1e-5), 2), abs=1e-4)


def test_privacy_config_is_checked_in_one_line():
    ok = config.updated(AggregatorConfig(), privacy={"mode": "central", "clip": 0.5})
    assert DpPolicy.from_config(ok.privacy).clip == 0.5
    assert DpPolicy.from_config(AggregatorConfig().privacy) is None
    for bad, words in (({"mode": "local"}, "privacy.mode"), ({"mode": "central", "clip": 0}, "privacy.clip"),
                       ({"mode": "central", "sampling_rate": 0}, "sampling_rate"),
                       ({"mode": "central", "delta": 1}, "privacy.delta")):
        with pytest.raises(ConfigError, match=words):
            config.updated(AggregatorConfig(), privacy=bad).check()
    with pytest.raises(ConfigError, match=r"server\.aggregation"):
        config.updated(AggregatorConfig(), privacy={"mode": "central"}, server={"aggregation": "median"},
                       selection={"max_clients": 10}).check()


def test_an_old_announcement_without_dp_still_parses_and_a_bad_plan_is_refused():
    from fedge import wire

    core = make_core()
    actions = online(core, "a", "b") + core.handle(TimerFired(0.0))
    ann = announcement(actions)
    assert ann.dp is None
    env = wire.decode(dataclasses.replace(ann, dp=DpPlan(1.0, "central", 0.0)).encode())
    bad = wire.encode(env.kind, {**env.header, "dp": {"clip": "big", "noise": "central"}}, env.body)
    with pytest.raises(Exception, match="dp clip"):
        RoundAnnouncement.parse(wire.decode(bad))


def test_a_round_with_nobody_sampled_releases_noise_and_the_next_round_is_unharmed():
    core = dp_core(rate=1e-9, rounds=10)  # nobody is sampled
    actions = online(core, "a", "b", "c") + core.handle(TimerFired(0.0))
    assert announcement(actions).selected == ()
    [fin] = finished(core.handle(TimerFired(1000.0)))  # its deadline closes it; round 2 opens, empty too
    assert fin.record.status == "ok" and fin.record.clients == 0 and fin.record.extra["dp_rounds"] == 1
    for t in (2000.0, 3000.0, 4000.0):  # rounds 2-4: empty too (their medians must not become the history)
        core.handle(TimerFired(t))
    assert core.norm_history == [] and core.sample_history == []
    core.policy = dataclasses.replace(core.policy, privacy=DpPolicy(PrivacySpec(1.0, 1.0, 1e-5), clip=0.5))
    actions = core.handle(TimerFired(5000.0))  # round 5 closes; round 6 samples everyone
    ann = announcement(actions)
    assert ann.round == 6 and ann.selected == ("a", "b", "c")
    for c in ann.selected:
        actions += send(core, c, update(core, c, samples=7), now=5001.0)
    fin = finished(actions)[-1]
    assert fin.record.round == 6 and fin.record.status == "ok" and fin.record.clients == 3
    assert fin.record.train_loss is not None and core.counters.get("internal_error", 0) == 0
