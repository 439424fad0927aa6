"""The defences (norm bound, weight cap, finite checks) and the robust
aggregation rules, against NumPy references and the fault campaign's cases."""

import dataclasses

import numpy as np
import pytest

from aggregator.fold import RoundUpdates, l2_norm
from aggregator.optimizers.fedavg import FedAvg
from aggregator.robust import (
    CALIBRATION,
    Defences,
    RoundAggregate,
    dense,
    dense_bytes,
    norm_bound,
    sample_cap,
)
from fedge import tensors
from fedge.codecs import CodecError, make_codec
from fedge.tensors import TensorSpec
from tests.unit.builders import INITIAL, finished, make_core, online, send, update

SHAPES = {"a": (5, 4), "b": (4,)}
SPEC = TensorSpec(tuple(SHAPES.items()))
NONE = make_codec("none")
rng = np.random.default_rng(7)


def rand(scale=1.0):
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def admitted(deltas, samples=None, codec=NONE):
    ups = RoundUpdates(SPEC, codec)
    for i, d in enumerate(deltas):
        ups.admit(f"c{i}", codec.encode(d, rng), (samples or [10] * len(deltas))[i])
    return ups


def flat(arrays):
    return np.concatenate([arrays[k].reshape(-1) for k in SHAPES])


# --- weight cap ------------------------------------------------------------------


def test_no_update_counts_more_than_weight_cap_times_the_median_sample_count():
    d = Defences(weight_cap=2.0)
    assert sample_cap([100] * 9 + [10**6], [], d) == 200.0
    assert sample_cap([10**6, 10**6], [100.0] * 3, d) == 200.0  # recent rounds outvote a small round
    assert sample_cap([100], [], Defences(weight_cap=0.0)) is None


# --- norm bound ------------------------------------------------------------------


def test_adaptive_bound_is_a_multiple_of_the_rounds_median_norm():
    d = Defences(clip_multiplier=2.0)
    assert norm_bound([1.0, 2.0, 3.0, 100.0], [], d) == pytest.approx(2.0 * 2.5)
    assert norm_bound([1.0], [], d) is None  # one update and no history: nothing to compare with
    assert norm_bound([1.0, 50.0], [2.0, 2.0, 2.0], d) == pytest.approx(4.0)  # small round: recent rounds' medians
    assert norm_bound([1.0, 50.0], [], Defences(clip="fixed", clip_norm=3.0)) == 3.0
    assert norm_bound([1.0, 2.0, 3.0], [], Defences(clip="off")) is None


def test_a_scaled_update_is_clipped_to_the_bound_and_the_rest_untouched():
    honest = [rand() for _ in range(9)]
    attacker = {k: v * 100 for k, v in rand().items()}
    out = streamed([*honest, attacker], [10] * 10, Defences(weight_cap=0, clip_multiplier=2.0)).combine()
    norms = [l2_norm(d) for d in honest] + [l2_norm(attacker)]
    bound = 2.0 * float(np.median(norms[:CALIBRATION]))
    assert out.bound == pytest.approx(bound) and out.clipped == 1
    ref = (sum(flat(d) for d in honest) + flat(attacker) * (bound / l2_norm(attacker))) / 10
    np.testing.assert_allclose(flat(out.delta), ref, rtol=1e-5, atol=1e-6)


def test_mean_without_defences_is_the_sample_weighted_mean():
    deltas = [rand() for _ in range(6)]
    samples = [3, 40, 7, 19, 1, 30]
    out = streamed(deltas, samples, Defences(clip="off", weight_cap=0)).combine()
    ref = np.average(np.stack([flat(d) for d in deltas]), axis=0, weights=samples)
    np.testing.assert_allclose(flat(out.delta), ref, rtol=1e-5, atol=1e-6)
    assert out.clipped == 0 and out.capped == 0 and len(out.used) == 6


# --- the streaming mean ----------------------------------------------------------


def streamed(deltas, samples, d, history=((), ()), codec=NONE):
    agg = RoundAggregate(SPEC, codec, d)
    agg.reset(*history)
    for i, (delta, n) in enumerate(zip(deltas, samples, strict=True)):
        agg.admit(f"c{i}", codec.encode(delta, rng), n)
    return agg


def test_the_streaming_mean_fixes_bound_and_cap_from_its_first_updates_then_folds_on_arrival():
    deltas = [rand() for _ in range(12)]
    deltas[8] = {k: v * 100 for k, v in deltas[8].items()}  # after calibration: clipped
    samples = [10, 12, 9, 11, 10, 10, 10, 10, 10, 10**6, 10, 10]  # c9 claims 10^6: capped
    d = Defences(clip_multiplier=1.5, weight_cap=2.0)
    agg = streamed(deltas, samples, d)
    assert all(a.body is None for a in agg.items)  # nothing kept once folded
    norms = [l2_norm(x) for x in deltas]
    bound = 1.5 * float(np.median(norms[:CALIBRATION]))
    cap = 2.0 * float(np.median(samples[:CALIBRATION]))
    w = np.minimum(samples, cap)
    f = np.minimum(1.0, bound / np.array(norms))
    ref = sum(w[i] * f[i] * flat(deltas[i]) for i in range(12)) / w.sum()
    out = agg.combine()
    assert out.bound == pytest.approx(bound) and out.clipped == int((f < 1).sum()) and out.capped == 1
    np.testing.assert_allclose(flat(out.delta), ref, rtol=1e-5, atol=1e-6)
    assert out.median_samples == 10.0 and len(out.used) == 12


def test_a_small_round_fixes_its_bound_at_close_and_recent_rounds_outvote_its_own_updates():
    deltas = [rand(), {k: v * 50 for k, v in rand().items()}]
    agg = streamed(deltas, [10, 10**6], Defences(), history=([1.0] * 4, [10.0] * 4))
    out = agg.combine()
    assert out.bound == pytest.approx(1.25)  # the default 1.25 x the median of the history and the two norms
    assert out.clipped == 2 and out.capped == 1  # cap: 2 x 10 samples


def test_an_overflowing_update_is_refused_on_arrival_once_the_bound_is_fixed():
    d = Defences(clip="off", weight_cap=0.0)
    agg = streamed([rand() for _ in range(CALIBRATION)], [10] * CALIBRATION, d)
    big = {k: np.full(s, 3e38, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(CodecError) as err:
        agg.admit("x", NONE.encode(big, rng), 10)
    assert err.value.reason == "overflow" and len(agg) == CALIBRATION


# --- robust rules ----------------------------------------------------------------


def test_median_and_trimmed_mean_match_numpy():
    deltas = [rand() for _ in range(7)]
    stack = np.stack([flat(d) for d in deltas])
    ups = admitted(deltas)
    med = dense(ups, Defences(rule="median", clip="off"), [])[0]
    np.testing.assert_allclose(flat(med.sum), np.median(stack, axis=0), rtol=1e-6)
    trim = dense(ups, Defences(rule="trimmed_mean", clip="off", trim_fraction=0.2), [])[0]
    k = 1  # floor(0.2 * 7)
    np.testing.assert_allclose(flat(trim.sum), np.sort(stack, axis=0)[k:7 - k].mean(axis=0), rtol=1e-5, atol=1e-7)


def test_krum_leaves_out_the_update_far_from_the_others():
    base = rand()
    honest = [{k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(8)]
    attacker = {k: -v for k, v in base.items()}  # sign-flipped, same norm: the bound alone does not catch it
    ups = admitted([*honest, attacker])
    out = dense(ups, Defences(rule="krum", clip="off", krum_f=1), [])[0]
    assert "c8" not in out.used and len(out.used) == 8 and out.averaged
    np.testing.assert_allclose(flat(out.sum), np.mean([flat(d) for d in honest], axis=0), rtol=1e-4, atol=1e-6)


def test_robust_rules_survive_a_single_update():
    ups = admitted([rand()])
    for rule in ("median", "trimmed_mean", "krum"):
        out = dense(ups, Defences(rule=rule), [])[0]
        np.testing.assert_allclose(flat(out.sum), flat(ups.decode(ups.items[0].body)), rtol=1e-6)


def test_dense_memory_is_four_bytes_per_parameter_per_update():
    assert dense_bytes(SPEC, 10) == 4 * 24 * 10 + 8 * 100


# --- admission -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_payload_is_refused_and_nothing_is_kept(bad):
    d = {k: v.astype(np.float16) for k, v in rand().items()}
    d["a"][0, 0] = bad
    ups = RoundUpdates(SPEC, make_codec("fp16"))
    with pytest.raises(CodecError) as err:
        ups.admit("x", tensors.pack(d), 10)  # a hostile encoder: ours refuses to send it
    assert err.value.reason == "nonfinite" and len(ups) == 0


def test_a_finite_update_whose_float32_norm_overflows_is_measured_in_float64():
    d = {k: np.full(s, 3e38, np.float32) for k, s in SHAPES.items()}
    ups = admitted([d])
    assert np.isfinite(ups.items[0].norm) and ups.items[0].norm > 3e38


# --- the fault campaign, through the round core ----------------------------------


def _round(core, deltas_and_samples):
    """One round with every client selected (the round opens once all are online)."""
    clients = sorted(deltas_and_samples)
    core.policy = dataclasses.replace(core.policy, min_clients=len(clients))
    online(core, *clients)
    actions = []
    for c in clients:
        delta, samples = deltas_and_samples[c]
        actions += send(core, c, update(core, c, delta=delta, samples=samples))
    return actions


def _honest(scale=0.01):
    return {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in INITIAL.items()}


def test_a_huge_finite_update_with_a_huge_weight_cannot_crash_or_overflow_the_round():
    """Campaign case 2: scale 3e38 and 10^6 samples overflowed the sum to Inf
    and crashed the downlink quantizer at round close."""
    core = make_core(codec="int8", downlink={"name": "int4", "block": 64}, max_clients=0)
    clients = {f"d{i}": (_honest(), 10) for i in range(9)}
    clients["evil"] = ({k: np.full(v.shape, 3e38, np.float32) for k, v in INITIAL.items()}, 10**6)
    actions = _round(core, clients)
    [fin] = finished(actions)
    assert fin.record.status == "ok" and fin.record.clipped >= 1 and fin.record.weight_capped == 1
    assert all(np.isfinite(v).all() and np.abs(v - INITIAL[k]).max() < 1.0 for k, v in core.models.exact.items())


def test_one_heavy_scaled_update_moves_the_model_little():
    """Campaign case 3: 10^6 samples and scale 10 took accuracy from 0.97 to
    0.10. With the defaults the attacker's pull is bounded by the cap and the
    norm bound: within a few honest steps' length."""
    core = make_core(max_clients=0)
    honest = {f"d{i}": (_honest(), 10) for i in range(9)}
    clean = make_core(max_clients=0)
    _round(clean, honest)
    attacked = dict(honest, evil=({k: v * 1000 for k, v in _honest().items()}, 10**6))
    _round(core, attacked)
    honest_step = max(np.abs(clean.models.exact[k] - INITIAL[k]).max() for k in INITIAL)
    attacked_step = max(np.abs(core.models.exact[k] - INITIAL[k]).max() for k in INITIAL)
    assert attacked_step < 5 * honest_step


def test_a_round_whose_model_would_not_be_finite_fails_and_keeps_the_model():
    # The median holds the round dense, without the streaming mean's check
    # that refuses an update that would overflow the sum (below).
    core = make_core(defences=Defences(rule="median", clip="off", weight_cap=0.0))
    core.optimizer = FedAvg(lr=2.0)  # a server step that overflows float32
    before = {k: v.copy() for k, v in core.models.exact.items()}
    big = {k: np.full(v.shape, 3e38, np.float32) for k, v in INITIAL.items()}
    actions = _round(core, {"a": (big, 10), "b": (big, 10)})
    [fin] = finished(actions)
    assert fin.record.status == "failed" and fin.record.failure == "nonfinite_model"
    assert core.counters["nonfinite_model"] == 1
    assert all(np.array_equal(core.models.exact[k], before[k]) for k in before)
    assert core.next_round == 2  # the job moves on


def test_the_streaming_mean_refuses_an_update_that_would_overflow_its_sum():
    core = make_core(defences=Defences(clip="off", weight_cap=0.0))
    big = {k: np.full(v.shape, 3e38, np.float32) for k, v in INITIAL.items()}
    ups = {f"d{i}": (_honest(), 10) for i in range(6)}
    actions = _round(core, {**ups, "x": (big, 10)})
    [fin] = finished(actions)
    assert fin.record.status == "ok" and fin.record.rejected == {"overflow": 1}
    assert all(np.isfinite(v).all() for v in core.models.exact.values())


def test_the_norm_history_survives_a_restart():
    core = make_core()
    _round(core, {f"d{i}": (_honest(), 10) for i in range(4)})
    assert len(core.defence_history.norms) == 1
    arrays, meta = core.snapshot()
    again = make_core()
    again.restore(arrays, meta, None)
    assert again.defence_history.norms == core.defence_history.norms


# --- direction -------------------------------------------------------------------


def test_an_update_pointing_against_the_reference_is_left_out_on_arrival():
    reference = rand()
    along = [{k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in reference.items()} for _ in range(6)]
    against = {k: -v for k, v in along[0].items()}  # the same norm, flipped
    agg = RoundAggregate(SPEC, NONE, Defences(clip="off"))
    agg.reset((), (), reference)
    for i, d in enumerate([*along, against]):
        agg.admit(f"c{i}", NONE.encode(d, rng), 10)
    assert [a.client for a in agg.left] == ["c6"]
    assert agg.cosines["c6"] < 0 < min(agg.cosines[f"c{i}"] for i in range(6))
    out = agg.combine()
    assert "c6" not in out.used and len(out.used) == 6
    np.testing.assert_allclose(flat(out.delta), np.mean([flat(d) for d in along], axis=0), rtol=1e-4, atol=1e-6)


def test_without_a_reference_or_with_direction_off_nothing_is_left_out():
    deltas = [rand(), {k: -v for k, v in rand().items()}]
    for d, ref in ((Defences(), None), (Defences(direction="off"), rand())):
        agg = RoundAggregate(SPEC, NONE, d)
        agg.reset((), (), ref)
        for i, x in enumerate(deltas):
            agg.admit(f"c{i}", NONE.encode(x, rng), 10)
        assert agg.left == [] and len(agg.combine().used) == 2


def test_the_core_steers_by_the_changes_it_applied_and_a_sign_flipper_is_left_out():
    core = make_core()
    direction = _honest()

    def honest():
        return {k: v + 0.002 * rng.normal(size=v.shape).astype(np.float32) for k, v in direction.items()}

    clients = ["d0", "d1", "d2", "d3", "flip"]
    _round(core, {c: (honest(), 10) for c in clients})  # honest in round 1: no reference yet
    assert core.defence_history.reference is not None  # the change just applied
    flip = {k: -v for k, v in honest().items()}
    [fin] = finished(_round(core, {**{c: (honest(), 10) for c in clients[:4]}, "flip": (flip, 10)}))
    assert fin.record.status == "ok" and fin.record.round == 2 and fin.record.left_out == ("flip",)
    # Its receipt said accepted: a left-out update is not refused (nothing the device can fix).
    assert core.counters["accepted"] == 10
    arrays, meta = core.snapshot()
    again = make_core()
    again.restore(arrays, meta, None)
    ref, ref_again = core.defence_history.reference, again.defence_history.reference
    assert all(np.array_equal(ref_again[k], ref[k]) for k in ref)


def test_a_round_whose_every_update_points_away_fails_and_the_filter_forgets_its_reference():
    core = make_core()
    direction = _honest()
    _round(core, {f"d{i}": (dict(direction), 10) for i in range(3)})
    actions = _round(core, {f"d{i}": ({k: -v for k, v in direction.items()}, 10) for i in range(3)})
    [fin] = finished(actions)
    assert fin.record.status == "failed" and fin.record.failure == "aggregation_failed"
    assert core.defence_history.reference is None  # the next round is not filtered: a filter never stops a job
    [fin] = finished(_round(core, {f"d{i}": ({k: -v for k, v in direction.items()}, 10) for i in range(3)}))
    assert fin.record.status == "ok"


def test_a_left_out_update_still_votes_for_the_next_reference_and_the_cutoff_follows_the_spread():
    """Issue 26, item 7: the reference used to follow the admitted updates
    only, so a device left out once kept pointing away from it for good (on
    non-IID data honest devices sat out 53% of their updates). Every update
    now votes, left out or not, weighted as the round's mean weighs it (here
    equal samples, no bound: the sum over the sum of norms); and the cutoff drops to the previous
    round's median cosine less three robust deviations when honest devices
    spread wider than tau allows."""
    from aggregator.robust import direction_cutoff

    reference = rand()
    along = [{k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in reference.items()} for _ in range(3)]
    against = {k: -v * 2 for k, v in reference.items()}
    agg = RoundAggregate(SPEC, NONE, Defences(clip="off"))
    agg.reset((), (), reference)
    for i, d in enumerate([*along, against]):
        agg.admit(f"c{i}", NONE.encode(d, rng), 10)
    assert [a.client for a in agg.left] == ["c3"]
    agreed = agg.agreed_direction()
    every = [flat(d) for d in [*along, against]]
    want = np.sum(every, axis=0) / sum(np.linalg.norm(v) for v in every)
    np.testing.assert_allclose(flat(agreed), want, rtol=1e-4, atol=1e-6)
    # The cutoff: tau while the previous round's cosines agree; lower where they spread.
    assert direction_cutoff(0.0, [0.5, 0.55, 0.6, 0.45, 0.5]) == 0.0
    wide = [0.3, 0.05, -0.2, 0.25, -0.1, 0.1, 0.0]
    med = np.median(wide)
    assert direction_cutoff(0.0, wide) == pytest.approx(med - 3 * 1.4826 * np.median(np.abs(np.array(wide) - med)))
    assert direction_cutoff(0.0, [0.3]) == 0.0  # too few to say
    agg.reset((), (), reference, cutoff=-0.9)
    agg.admit("c3", NONE.encode(against, rng), 10)  # cosine -1: still below any cutoff
    assert [a.client for a in agg.left] == ["c3"]
    agg.reset((), (), reference, cutoff=-0.5)
    mild = {k: -0.2 * v + rng.normal(size=v.shape).astype(np.float32) for k, v in reference.items()}
    agg.admit("c4", NONE.encode(mild, rng), 10)
    assert agg.cosines["c4"] < 0 and agg.left == []  # below tau, above the round's cutoff: kept


def test_the_cutoffs_cosines_survive_a_restart():
    core = make_core()
    direction = _honest()
    for _ in range(2):
        _round(core, {f"d{i}": ({k: v + 0.002 * rng.normal(size=v.shape).astype(np.float32)
                                 for k, v in direction.items()}, 10) for i in range(4)})
    assert len(core.defence_history.cosines) == 4
    arrays, meta = core.snapshot()
    again = make_core()
    again.restore(arrays, meta, None)
    assert again.defence_history.cosines == core.defence_history.cosines


def test_a_dense_rules_reference_follows_every_update_as_the_mean_would_weigh_it():
    reference = rand()
    along = [{k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in reference.items()} for _ in range(3)]
    against = {k: -v * 2 for k, v in reference.items()}
    agg = RoundAggregate(SPEC, NONE, Defences(rule="median", clip="off"))
    agg.reset((), (), reference)
    for i, d in enumerate([*along, against]):
        agg.admit(f"c{i}", NONE.encode(d, rng), 10)
    assert [a.client for a in agg.left] == ["c3"]
    agg.combine()
    every = [flat(d) for d in [*along, against]]
    want = np.sum(every, axis=0) / sum(np.linalg.norm(v) for v in every)
    np.testing.assert_allclose(flat(agg.agreed_direction()), want, rtol=1e-4, atol=1e-6)


def test_a_private_round_neither_filters_nor_moves_the_reference():
    """The reference and the cutoff are made of single updates, which the
    privacy accountant does not count: a private round must not use them."""
    from aggregator.privacy import DpRound

    reference = rand()
    against = {k: -v for k, v in reference.items()}
    agg = RoundAggregate(SPEC, NONE, Defences())
    agg.reset((), (), reference, dp=DpRound(clip=1e6, noise_std=0.0, denominator=2.0))
    agg.admit("c0", NONE.encode(against, rng), 10)
    agg.admit("c1", NONE.encode(against, rng), 10)
    assert not agg.left and not agg.cosines
    agg.combine()
    assert agg.agreed_direction() is None
