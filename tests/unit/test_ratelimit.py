"""Token buckets per device, bounded in number."""

import pytest

from aggregator.ratelimit import RateLimiter


def test_a_burst_then_the_rate():
    lim = RateLimiter(rate=2.0, burst=3)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("a", 0.5) and not lim.allow("a", 0.5)  # one token back after 0.5 s
    assert lim.allow("b", 0.5)  # buckets are per key


def test_a_cost_larger_than_the_tokens_takes_nothing():
    lim = RateLimiter(rate=1.0, burst=10)
    assert not lim.allow("a", 0.0, cost=11)
    assert lim.allow("a", 0.0, cost=10)


def test_buckets_are_bounded_and_the_idlest_is_forgotten():
    lim = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for k in "abcd":
        lim.allow(k, 0.0)
    assert len(lim) == 3
    assert lim.allow("a", 0.0)  # forgotten, so full again
    assert not lim.allow("d", 0.0)


def test_nonsense_limits_are_refused():
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
