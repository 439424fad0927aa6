"""Partials: what a round's updates add up to, which a relay forwards and a
buffer holds (``aggregator.pipeline``)."""

import dataclasses

import numpy as np
import pytest

from aggregator.pipeline import Partial, release
from aggregator.privacy import DpRound, release_private
from aggregator.robust import Defences, RoundAggregate
from fedge.codecs import make_codec
from fedge.tensors import TensorSpec

SPEC = TensorSpec((("w", (4, 3)), ("b", (3,))))
NONE = make_codec("none")
PLAIN = Defences(clip="off", weight_cap=0.0, direction="off")


def deltas(n, seed):
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(size=shape).astype(np.float32) for name, shape in SPEC.entries} for _ in range(n)]


def partial_of(updates, samples, d=PLAIN):
    agg = RoundAggregate(SPEC, NONE, d)
    rng = np.random.default_rng(0)
    for i, (delta, n) in enumerate(zip(updates, samples, strict=True)):
        agg.admit(f"c{i}-{n}", NONE.encode(delta, rng), n)
    return agg.partial()


def test_two_regions_partials_add_up_to_the_whole_rounds_mean():
    ups, samples = deltas(7, 1), [10, 20, 5, 40, 10, 10, 30]
    whole = release(partial_of(ups, samples)).delta
    north, south = partial_of(ups[:3], samples[:3]), partial_of(ups[3:], samples[3:])
    both = north.plus(south)
    assert both.weight == sum(samples) and len(both.used) == 7
    got = release(both).delta
    want = {k: sum(n * u[k] for u, n in zip(ups, samples, strict=True)) / sum(samples) for k in whole}
    for k in whole:
        np.testing.assert_allclose(got[k], whole[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_partial_is_not_changed_by_the_next_round():
    agg = RoundAggregate(SPEC, NONE, PLAIN)
    rng = np.random.default_rng(0)
    for i, d in enumerate(deltas(6, 2)):
        agg.admit(f"c{i}", NONE.encode(d, rng), 10)
    kept = agg.partial()
    before = {k: v.copy() for k, v in kept.sum.items()}
    agg.reset((), ())
    for i, d in enumerate(deltas(6, 3)):
        agg.admit(f"c{i}", NONE.encode(d, rng), 10)
    agg.partial()
    for k in before:
        np.testing.assert_array_equal(kept.sum[k], before[k])


def test_a_dense_rules_result_is_a_mean_and_cannot_be_added_to():
    ups = deltas(5, 4)
    med = partial_of(ups, [10] * 5, dataclasses.replace(PLAIN, rule="median"))
    assert med.averaged and med.weight == 1.0
    np.testing.assert_array_equal(release(med).delta["w"], med.sum["w"])
    with pytest.raises(ValueError, match="dense rule"):
        med.plus(partial_of(ups, [10] * 5))


def test_an_empty_partial_is_released_only_with_noise():
    empty = Partial(sum={n: np.zeros(s, np.float32) for n, s in SPEC.entries}, weight=0.0, used=())
    with pytest.raises(ValueError, match="no updates"):
        release(empty)
    out = release_private(empty, DpRound(clip=1.0, noise_std=2.0, denominator=4.0))
    assert out.private is not None and out.private.noise_std == 2.0 and out.private.shares == 0
    assert float(np.std(np.concatenate([v.ravel() for v in out.delta.values()]))) > 0.1  # noise / 4, not zeros
