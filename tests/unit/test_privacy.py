"""Client-level differential privacy: the accountant against dp-accounting,
Poisson selection, clipping, the noise's standard deviation, the budget, and
the accountant's state across a restart."""

import dataclasses

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from aggregator import selection
from aggregator.config import AggregatorConfig
from aggregator.privacy import (
    DpPolicy,
    DpRound,
    PrivacySpec,
    adaptive_noise_multiplier,
    epsilon,
    noise_for_budget,
    rounds_within,
)
from aggregator.robust import Defences, RoundAggregate
from aggregator.rounds import TimerFired
from aggregator.selection import poisson
from fedge import config
from fedge.codecs import make_codec
from fedge.config import ConfigError
from fedge.messages import RoundAnnouncement
from fedge.privacy import DpPlan, add_noise, clip_update
from fedge.tensors import TensorSpec, l2_norm
from tests.unit.builders import acks, announcement, delta_for, finished, make_core, online, send, update

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


def dp_core(target=0.0, rate=1.0, rounds=5, min_devices=2, **kw):
    policy = DpPolicy(PrivacySpec(1.0, rate, 1e-5), clip=0.5, target_epsilon=target, min_devices=min_devices)
    return make_core(privacy=policy, rounds=rounds, defences=Defences(direction="off"), **kw)


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
    core = dp_core(min_devices=3)
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
    assert again.private.rounds == 1
    _, actions = run_round(again, ["a", "b"], 5000.0)
    [fin] = finished(actions)
    assert fin.record.round == 2 and fin.record.extra["dp_rounds"] == 2
    assert fin.record.extra["epsilon"] == pytest.approx(epsilon(PrivacySpec(1.0, 1.0, 1e-5), 2), abs=1e-4)


def test_privacy_config_is_checked_in_one_line():
    ok = config.updated(AggregatorConfig(), privacy={"mode": "central", "clip": 0.5, "min_devices": 10})
    assert DpPolicy.from_config(ok.privacy).clip == 0.5
    assert DpPolicy.from_config(AggregatorConfig().privacy) is None
    for bad, words in (({"mode": "local"}, "privacy.mode"), ({"mode": "central", "clip": 0}, "privacy.clip"),
                       ({"mode": "central", "sampling_rate": 0}, "sampling_rate"),
                       ({"mode": "central", "delta": 1}, "privacy.delta"),
                       ({"mode": "central"}, r"privacy\.min_devices.* 0\.2 devices.*at least 10")):
        with pytest.raises(ConfigError, match=words):
            config.updated(AggregatorConfig(), privacy=bad).check()
    with pytest.raises(ConfigError, match=r"server\.aggregation"):
        config.updated(AggregatorConfig(), privacy={"mode": "central", "min_devices": 10},
                       server={"aggregation": "median"},
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


def test_a_round_with_nobody_sampled_releases_noise_and_the_next_round_is_unharmed(monkeypatch):
    core = dp_core(rate=1.0, rounds=10, min_devices=3)
    monkeypatch.setattr(selection, "poisson", lambda *a, **kw: ())  # nobody is sampled
    actions = online(core, "a", "b", "c") + core.handle(TimerFired(0.0))
    assert announcement(actions).selected == ()
    # Nobody to wait for: it closes at once, not at its deadline; round 2 opens, empty too.
    fin = finished(actions + core.handle(TimerFired(0.1)))[0]
    assert fin.record.round == 1 and fin.record.seconds < 1
    assert fin.record.status == "ok" and fin.record.clients == 0 and fin.record.extra["dp_rounds"] == 1
    while core.next_round < 5:  # rounds 2-4: empty too (their medians must not become the history)
        core.handle(TimerFired(1000.0 * core.next_round))
    assert core.defence_history.norms == [] and core.defence_history.samples == []
    monkeypatch.undo()
    actions = core.handle(TimerFired(5000.0))  # round 5 closes; round 6 samples everyone
    ann = announcement(actions)
    assert ann.round == 6 and ann.selected == ("a", "b", "c")
    for c in ann.selected:
        actions += send(core, c, update(core, c, samples=7), now=5001.0)
    fin = finished(actions)[-1]
    assert fin.record.round == 6 and fin.record.status == "ok" and fin.record.clients == 3
    assert fin.record.train_loss is not None and core.counters.get("internal_error", 0) == 0


# --- distributed noise -------------------------------------------------------------


def test_distributed_noise_tops_up_what_missing_devices_did_not_add():
    # four devices expected; each adds a share of 2 / sqrt(4) = 1 per coordinate
    plan = DpRound(clip=1.0, noise_std=2.0, denominator=4.0, distributed=True, noisy_bound=1e6)
    assert plan.share == pytest.approx(1.0)
    share_rng = np.random.default_rng(5)
    for arrived, topped_up in ((0, 2.0), (1, np.sqrt(3.0)), (4, 0.0), (6, 0.0)):
        agg = RoundAggregate(SPEC, NONE, Defences(direction="off"))
        agg.reset((), (), None, plan)
        for i in range(arrived):  # each update: nothing but its share
            agg.admit(f"c{i}", NONE.encode(add_noise(rand(0.0), plan.share, share_rng), rng), 1)
        out = agg.combine()
        assert out.private.shares == arrived and out.private.noise_std == pytest.approx(topped_up)
        # what the released sum carries: the full noise (more, with more devices than expected)
        want = 2.0 ** 2 * max(1.0, arrived / 4.0)
        total = flat(out.delta) * 4.0
        assert abs(total.var() / want - 1) < 4 * np.sqrt(2 / total.size)
        assert out.clipped == 0


def test_a_distributed_round_bounds_a_noisy_update_without_shrinking_its_noise():
    core = make_core(codec="none", privacy=DpPolicy(PrivacySpec(1.0, 1.0, 1e-5), clip=0.5, noise="distributed",
                                                    min_devices=4),
                     defences=Defences(direction="off"), rounds=3, min_clients=4)
    actions = online(core, "a", "b", "c", "d") + core.handle(TimerFired(0.0))
    ann = announcement(actions)
    assert ann.dp == DpPlan(0.5, "distributed", 0.5 / 2.0, False, 0.0)  # z C / sqrt(q x 4)
    share_rng = np.random.default_rng(9)
    for c in ann.selected:  # honest devices: clipped, plus their share, sent as float32
        d, _ = clip_update(delta_for(c), 0.5)
        actions += send(core, c, update(core, c, delta=add_noise(d, ann.dp.noise_std, share_rng)), now=1.0)
    rec = finished(actions)[-1].record
    assert rec.status == "ok" and rec.clients == 4 and rec.clipped == 0  # no honest update was scaled down
    assert rec.extra["dp_noise"] == "distributed" and rec.extra["dp_noise_shares"] == 4
    assert rec.extra["dp_noise_added"] == 0.0
    # against the aggregator, which sees each update with its share alone: z / sqrt(4) per round
    assert rec.extra["epsilon_aggregator"] == pytest.approx(gaussian_reference(0.5, 1, 1e-5), abs=1e-3)
    # a device that skips the clip is still bounded, far above the clip
    actions = core.handle(TimerFired(2.0))
    actions += send(core, "a", update(core, "a", delta=delta_for("a", scale=1e4)), now=3.0)
    for c in "bcd":
        actions += send(core, c, update(core, c, delta=delta_for(c, scale=1e-3)), now=3.0)
    rec = finished(actions)[-1].record
    assert rec.clipped == 1 and rec.norm_bound > 0.5


def gaussian_reference(z, rounds, delta, accountant="rdp"):
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return acc.get_epsilon(delta)


def test_the_worst_devices_epsilon_with_known_participation_counts_only_its_rounds():
    core = dp_core(rate=1.0, rounds=4)
    actions = online(core, "a", "b")
    for r, senders in enumerate((["a", "b"], ["a", "b"], ["a"]), start=1):  # b is silent in round 3
        assert core.open.round == r and core.open.selected == ("a", "b")
        now = 10.0 * r
        for c in senders:
            actions += send(core, c, update(core, c, samples=7), now=now)
        if len(senders) < 2:
            actions += core.handle(TimerFired(now + 59.0))  # its deadline (60 s from its opening)
    rec = finished(actions)[-1].record
    assert rec.round == 3 and rec.accepted == ("a",)
    assert core.private.ledger.released == {"a": 3.0, "b": 2.0}  # sum of z^-2 over the rounds it was in
    assert rec.extra["epsilon_participant"] == pytest.approx(gaussian_reference(1.0, 3, 1e-5), abs=1e-3)
    assert "epsilon_aggregator" not in rec.extra  # central noise: the aggregator sees clipped updates
    arrays, meta = core.snapshot()
    again = dp_core(rate=1.0, rounds=4)
    again.restore(arrays, meta, None)
    assert again.private.ledger.to_json() == core.private.ledger.to_json()


# --- adaptive clipping ---------------------------------------------------------------


def adaptive_core(clip=0.01, bit_noise=1.0):
    policy = DpPolicy(PrivacySpec(1.0, 1.0, 1e-5), clip=clip, clip_quantile=0.5, clip_learning_rate=0.2,
                      clip_bit_noise=bit_noise, min_devices=4)
    return make_core(privacy=policy, rounds=60, defences=Defences(direction="off"), min_clients=4)


def test_adaptive_clipping_follows_the_quantile_and_its_cost_comes_out_of_the_models_noise():
    core = adaptive_core(clip=0.1)
    norms = {c: 0.5 * (i + 1) for i, c in enumerate("abcd")}  # 0.5, 1, 1.5, 2: the median is 1-1.5
    clips = []
    actions = online(core, *norms)
    assert announcement(actions).dp.bit
    for r in range(60):
        plan, now = core.round_dp, 10.0 * r
        clips.append(plan.clip)
        for c in core.open.selected:
            d = delta_for(c)
            d = {k: v * np.float32(norms[c] / l2_norm(delta_for(c))) for k, v in d.items()}
            within = norms[c] <= plan.clip
            actions = send(core, c, update(core, c, delta=d, clip_bit=0.5 if within else -0.5), now=now)
        rec = finished(actions)[-1].record
        assert rec.round == r + 1 and rec.extra["dp_clip"] == pytest.approx(clips[-1], rel=1e-5)
        assert rec.extra["dp_next_clip"] == pytest.approx(core.private.clip, rel=1e-5)
    # up from 0.1 to about the median norm; the count's noise (std 1 over 4
    # devices) moves single steps either way, so only the trend is checked
    assert np.median(clips[10:20]) > clips[0] and 0.6 < np.median(clips[-10:]) < 2.5
    # z = 1 in all: the model's own noise is the rest of it, (1 - (2 x 1)^-2)^-1/2
    assert core.round_dp.noise_std == pytest.approx(clips[-1] * (1 - 0.25) ** -0.5, rel=1e-5)


def test_an_adaptive_round_refuses_an_update_without_its_report_and_bounds_a_wild_one():
    core = adaptive_core(clip=1.0)
    ann = announcement(online(core, "a", "b", "c", "d"))
    [ack] = acks(send(core, "a", update(core, "a"), now=1.0))
    assert ack.status == "rejected" and ack.reason.startswith("missing_clip_bit")
    agg = core.updates
    send(core, "a", update(core, "a", clip_bit=1e9, update_id="u2"), now=1.0)
    assert agg.bits == pytest.approx(0.5)  # one report moves the count by 1/2 at most
    assert ann.dp.bit_std == 0.0  # central: no share


def test_adaptive_clipping_that_leaves_the_model_no_noise_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"clip_bit_noise|bit-query"):
        config.updated(AggregatorConfig(), privacy={"mode": "central", "noise_multiplier": 1.0, "min_devices": 10,
                                                    "clip_quantile": 0.5, "clip_bit_noise": 0.4}).check()
    ok = config.updated(AggregatorConfig(), privacy={"mode": "distributed", "clip_quantile": 0.5, "min_devices": 10},
                        codec={"name": "none"})
    ok.check()
    assert DpPolicy.from_config(ok.privacy).adaptive
    with pytest.raises(ConfigError, match=r"codec\.name = \"none\""):  # int2 would quantize shares
        config.updated(AggregatorConfig(), privacy={"mode": "distributed", "min_devices": 10}).check()


def test_the_noise_for_a_budget_is_the_smallest_that_keeps_the_rounds_within_it():
    z = noise_for_budget(3.0, 100, 0.05, 1e-3)
    assert epsilon(PrivacySpec(z, 0.05, 1e-3), 100) <= 3.0 < epsilon(PrivacySpec(z * 0.99, 0.05, 1e-3), 100)
    with pytest.raises(ValueError, match="no noise multiplier"):
        noise_for_budget(1e-6, 100, 1.0, 1e-9, high=2.0)


# --- the cohort (issue 26, item 10) -------------------------------------------------


def test_a_private_round_never_opens_below_its_cohort_and_divides_by_a_fixed_number():
    """Presence arrives one device at a time, with no settling: round 1 used
    to open with the first device online and divide the noised sum by
    max(1, q x 1), releasing noise 1/q times too large."""
    policy = DpPolicy(PrivacySpec(1.0, 0.5, 1e-5), clip=0.5, min_devices=10)
    core = make_core(privacy=policy, rounds=3, defences=Defences(direction="off"), min_clients=1, settle_s=0.0)
    core.start(0.0)
    clients = [f"d{i:02d}" for i in range(20)]
    for i, c in enumerate(clients[:10]):
        ann = announcement(online(core, c, now=float(i)))
        assert (ann is None or ann.state != "open") == (i < 9), (i, ann)
    assert core.round_dp is not None and core.round_dp.denominator == 5.0  # q x min_devices
    assert core.round_dp.noise_std == pytest.approx(0.5)  # z x clip: divided by 5, not by 0.5 x who was online
    # With twice the fleet online, each device is sampled half as often: the
    # same expected cohort, the same denominator, never above q.
    online(core, *clients[10:], now=20.0)
    assert policy.rate(20) == 0.25 and policy.rate(10) == 0.5 and policy.rate(5) == 0.5
    sizes = [len(selection.poisson(clients, rate=policy.rate(20), seed=s, round_=1)) for s in range(400)]
    assert abs(np.mean(sizes) - 5.0) < 0.3


def test_a_private_job_whose_cohort_is_under_one_device_is_refused_at_start():
    with pytest.raises(ConfigError, match=r"privacy\.min_devices.*at least 10"):
        config.updated(AggregatorConfig(), privacy={"mode": "central", "sampling_rate": 0.1},
                       selection={"min_clients": 5}).check()
    ok = config.updated(AggregatorConfig(), privacy={"mode": "central", "sampling_rate": 0.1},
                        selection={"min_clients": 10})  # 0: min_clients
    ok.check()
    assert DpPolicy.from_config(ok.privacy, ok.selection.min_clients).denominator == pytest.approx(1.0)
