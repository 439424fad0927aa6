"""Who takes part in a round: pure functions, so every rule is a plain test."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aggregator.selection import eligible, quorum_size, select


def test_eligible_keeps_trainers_whose_build_decodes_the_job_s_codecs():
    online = {
        "b": {"role": "trainer", "codecs": ["int8", "int4"]},
        "a": {"codecs": ["int8"]},  # no role: a trainer
        "kiosk": {"role": "inference", "codecs": ["int8", "int4"]},
        "old": {"role": "trainer", "codecs": ["none"]},
        "bare": {},  # says nothing about codecs: assumed able
    }
    assert eligible(online, ["int8"]) == ["a", "b", "bare"]
    assert eligible(online, ["int8", "int4"]) == ["b", "bare"]


@given(n=st.integers(1, 60), fraction=st.floats(0.01, 1.0), min_clients=st.integers(1, 10),
       max_clients=st.integers(0, 20), seed=st.integers(0, 5), round_=st.integers(1, 100))
def test_select_is_a_bounded_seeded_subset(n, fraction, min_clients, max_clients, seed, round_):
    candidates = [f"dev-{i:02d}" for i in range(n)]
    kw = dict(fraction=fraction, min_clients=min_clients, max_clients=max_clients, seed=seed, round_=round_)
    picked = select(candidates, **kw)
    assert picked == select(candidates, **kw), "a restarted aggregator picks the same devices"
    assert len(set(picked)) == len(picked) and set(picked) <= set(candidates) and list(picked) == sorted(picked)
    assert len(picked) <= n and (not max_clients or len(picked) <= max_clients)
    if not max_clients or max_clients >= min_clients:
        assert len(picked) >= min(n, min_clients)


def test_select_changes_with_the_round():
    candidates = [f"dev-{i:02d}" for i in range(100)]
    rounds = {select(candidates, fraction=0.1, min_clients=1, max_clients=0, seed=0, round_=r) for r in range(1, 6)}
    assert len(rounds) == 5


def test_quorum_size():
    assert quorum_size(10, 1.0) == 10 and quorum_size(10, 0.8) == 8 and quorum_size(10, 0.01) == 1
    assert quorum_size(3, 0.5) == 2 and quorum_size(0, 1.0) == 0
