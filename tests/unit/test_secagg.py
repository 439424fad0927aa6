"""Secure aggregation's protocol core: the sum is exact with dropouts at
every stage up to what the threshold tolerates, nothing is revealed below
it, masked inputs look uniform, and the integers cannot overflow."""

import numpy as np
import pytest

from fedge.ddgauss import discrete_gaussian, rounding_bound
from fedge.ddgauss import tau as ddgauss_tau
from fedge.secagg import (
    Context,
    SecAggClient,
    SecAggError,
    SecAggPlan,
    SecAggServer,
    _combine,
    _split,
    dequantize,
    neighbours,
    pack,
    quantize,
    quantize_noisy,
    unpack,
)

CTX = Context("job", 3, 1)
COUNT = 257


def plan(n=8, threshold=3, degree=4, bits=12, bound=1.0):
    return SecAggPlan.for_devices(n, threshold, degree, bits, bound)


def run(p, inputs, drop=None):
    """One attempt over ``inputs`` (device -> uint32 vector); ``drop`` maps a
    stage (1-4) to the devices that go silent from it on. Returns the server."""
    drop = {k: set(v) for k, v in (drop or {}).items()}
    gone = set()
    clients = {u: SecAggClient(u, p, CTX) for u in inputs}
    server = SecAggServer(p, CTX, COUNT)
    gone |= drop.get(1, set())
    for u, c in clients.items():
        if u not in gone:
            server.add_keys(u, *c.advertise())
    keys = server.key_set()
    gone |= drop.get(2, set())
    for u in keys:
        if u not in gone:
            server.add_shares(u, clients[u].share(keys))
    gone |= drop.get(3, set())
    for u in sorted(server.sharers):
        if u not in gone:
            server.add_input(u, clients[u].masked_input(inputs[u], server.shares_for(u), server.sharers))
    gone |= drop.get(4, set())
    for u in sorted(server.survivors):
        if u not in gone:
            server.add_reveal(u, clients[u].unmask(server.survivors))
    return server


def inputs_for(p, n, seed=0):
    rng = np.random.default_rng(seed)
    return {f"d{i:02d}": quantize(rng.uniform(-1, 1, COUNT), p, rng) for i in range(n)}


def expected(p, inputs, who):
    total = np.zeros(COUNT, dtype=np.uint32)
    for u in who:
        total += inputs[u]
    return total & np.uint32(p.mask)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
@pytest.mark.parametrize("dropped", [0, 1, 2])
def test_the_sum_is_exact_with_dropouts_at_each_stage(stage, dropped):
    p = plan()
    inputs = inputs_for(p, 8, seed=stage * 10 + dropped)
    gone = {f"d{i:02d}" for i in range(dropped)}
    server = run(p, inputs, {stage: gone})
    assert server.ready()
    included = set(inputs) - gone if stage <= 3 else set(inputs)  # a device gone at stage 4 had sent its input
    assert server.survivors == included
    np.testing.assert_array_equal(server.result(), expected(p, inputs, included))


def test_dropouts_spread_over_every_stage_and_the_full_graph():
    p = plan(n=7, threshold=4, degree=6)  # degree >= n - 1: plain SecAgg, everyone is a neighbour
    inputs = inputs_for(p, 7, seed=5)
    server = run(p, inputs, {1: {"d00"}, 2: {"d01"}, 3: {"d02"}})
    np.testing.assert_array_equal(server.result(), expected(p, inputs, {"d03", "d04", "d05", "d06"}))


def test_below_the_threshold_nothing_is_revealed():
    p = plan(threshold=4, degree=5)
    inputs = inputs_for(p, 8)
    with pytest.raises(SecAggError, match="threshold"):
        run(p, inputs, {3: {f"d{i:02d}" for i in range(5)}})  # 3 masked inputs: the devices refuse to reveal
    # a device asked to reveal for too few survivors refuses, and reveals once only
    client = SecAggClient("a", p, CTX)
    client.sharers = frozenset("abcde")
    with pytest.raises(SecAggError, match="nothing is revealed"):
        client.unmask({"a", "b"})
    client.unmask({"a", "b", "c", "d"})
    with pytest.raises(SecAggError, match="already revealed"):
        client.unmask({"a", "b", "c", "d"})


def test_too_many_dropouts_at_unmasking_leave_the_sum_masked():
    p = plan(threshold=3, degree=4)
    inputs = inputs_for(p, 8)
    server = run(p, inputs, {4: {f"d{i:02d}" for i in range(6)}})  # two reveal: too few shares
    assert not server.ready()
    with pytest.raises(SecAggError, match="too few shares"):
        server.result()


def test_fewer_than_threshold_shares_say_nothing_about_the_secret():
    # t - 1 shares of two different secrets are distributed alike (uniform)
    rng_bytes = []
    for secret in (bytes(32), bytes([255]) * 32):
        firsts = np.array([_split(secret, 3, 5)[0][0] for _ in range(4000)])
        counts = np.bincount(firsts // 16, minlength=16)
        chi2 = float(((counts - 250) ** 2 / 250).sum())
        assert chi2 < 45  # 15 degrees of freedom: p < 1e-4 beyond this
        rng_bytes.append(firsts)
    secret = bytes(range(32))
    shares = _split(secret, 3, 5)
    assert _combine({1: shares[0], 2: shares[1]}) != secret
    assert _combine({1: shares[0], 3: shares[2], 5: shares[4]}) == secret


def test_a_masked_input_is_indistinguishable_from_uniform():
    p = plan(n=5, threshold=2, degree=4, bits=8)
    client = SecAggClient("a", p, CTX)
    others = {u: SecAggClient(u, p, CTX) for u in "bcde"}
    keys = {"a": client.advertise(), **{u: c.advertise() for u, c in others.items()}}
    client.share(keys)
    y = client.masked_input(np.zeros(60_000, dtype=np.uint32), {}, set(keys))  # the input is all zeros
    top = (y >> np.uint32(p.modulus_bits - 4)).astype(np.int64)
    counts = np.bincount(top, minlength=16)
    chi2 = float(((counts - 3750) ** 2 / 3750).sum())
    assert chi2 < 45


def test_integers_cannot_overflow_and_round_trip():
    for n, bits in ((10, 8), (300, 16), (1000, 12)):
        p = plan(n=n, bits=bits, bound=0.5)
        assert p.capacity() >= n and p.modulus_bits <= 32
        for sign in (1.0, -1.0):
            x = quantize(np.full(COUNT, sign * 7.0), p, np.random.default_rng(0))  # clamped to +-bound
            total = np.zeros(COUNT, dtype=np.uint32)
            for _ in range(n):
                total += x
            np.testing.assert_allclose(dequantize(total & np.uint32(p.mask), p), sign * 0.5 * n, rtol=1e-6)
    with pytest.raises(SecAggError, match="modulus"):
        plan(n=10**6, bits=24)
    p = plan(bits=12)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 100_000)
    mean = np.mean([dequantize(quantize(x[:1000], p, rng), p) for _ in range(200)], axis=0)
    assert np.abs(mean - x[:1000]).max() < 5 / p.scale  # unbiased: the rounding averages out
    v = rng.integers(0, 1 << p.modulus_bits, 1001, dtype=np.uint32)
    data = pack(v, p.modulus_bits)
    assert len(data) == (1001 * p.modulus_bits + 7) // 8
    np.testing.assert_array_equal(unpack(data, 1001, p.modulus_bits), v)
    with pytest.raises(SecAggError, match="bytes"):
        unpack(data[:-1], 1001, p.modulus_bits)


def test_the_graph_is_symmetric_shared_and_of_the_stated_degree():
    ids = [f"d{i:03d}" for i in range(50)]
    g = neighbours(ids, 6, CTX.graph_seed())
    assert g == neighbours(list(reversed(ids)), 6, CTX.graph_seed())
    assert all(len(vs) == 6 and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g != neighbours(ids, 6, Context("job", 3, 2).graph_seed())  # a new attempt, a new graph


def test_tampered_or_misrouted_shares_and_bad_inputs_are_refused():
    p = plan(n=5, threshold=2, degree=4)
    clients = {u: SecAggClient(u, p, CTX) for u in "abcde"}
    keys = {u: c.advertise() for u, c in clients.items()}
    sent = {u: c.share(keys) for u, c in clients.items()}
    tampered = bytearray(sent["b"]["a"])
    tampered[-1] ^= 1
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients["a"].masked_input(np.zeros(4, np.uint32), {"b": bytes(tampered)}, set(keys))
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients["a"].masked_input(np.zeros(4, np.uint32), {"b": sent["b"]["c"]}, set(keys))  # for c, not a
    with pytest.raises(SecAggError, match="own keys"):
        clients["a"].share({**keys, "a": keys["b"]})
    server = SecAggServer(p, CTX, 4)
    for u, c in clients.items():
        server.add_keys(u, *c.advertise())
    with pytest.raises(SecAggError, match="other keys"):
        server.add_keys("a", *clients["b"].advertise())
    server.key_set()
    with pytest.raises(SecAggError, match="did not share"):
        server.add_input("a", np.zeros(4, np.uint32))
    server.add_shares("a", sent["a"])
    with pytest.raises(SecAggError, match="values below"):
        server.add_input("a", np.full(4, 1 << 31, np.uint32))


def test_every_attempt_has_fresh_keys_and_seeds():
    p = plan()
    a1, a2 = SecAggClient("a", p, Context("job", 3, 1)), SecAggClient("a", p, Context("job", 3, 2))
    assert a1.advertise() != a2.advertise() and a1._b != a2._b
    assert len({k for c in (a1, a2) for k in c.advertise()}) == 4


def test_plans_are_checked():
    for kw in ({"threshold": 1}, {"degree": 2}, {"bits": 30}, {"bound": 0.0}):
        with pytest.raises(SecAggError):
            plan(**kw)


# --- the stages on the wire ----------------------------------------------------------


def test_every_stage_round_trips_and_malformed_stages_are_refused():
    from fedge import wire
    from fedge.messages import ProtocolError, SecAggStage

    p = plan(n=5, threshold=2, degree=4)
    clients = {u: SecAggClient(u, p, CTX) for u in ("d1", "d2", "d3")}
    keys = {u: c.advertise() for u, c in clients.items()}
    sealed = clients["d1"].share(keys)
    stages = [
        SecAggStage("job", 3, 1, "d1", "keys", ("d1",), (b"".join(keys["d1"]),)),
        SecAggStage("job", 3, 1, "d1", "keyset", ("d2", "d3"), (b"".join(keys["d2"]), b"".join(keys["d3"])),
                    peers=("d1", "d2", "d3")),
        SecAggStage("job", 3, 1, "d1", "shares", tuple(sealed), tuple(sealed.values())),
        SecAggStage("job", 3, 1, "d2", "routed", ("d1",), (sealed["d2"],), peers=("d1", "d2")),
        SecAggStage("job", 3, 1, "d2", "survivors", peers=("d1", "d2", "d3")),
        SecAggStage("job", 3, 1, "d2", "reveal", ("d1", "d3"), (bytes(32), bytes(range(32))), kinds="bs",
                    indices=(2, 3)),
    ]
    for msg in stages:
        assert SecAggStage.parse(wire.decode(msg.encode())) == msg
    good = wire.decode(stages[0].encode())
    for change, body in (({"stage": "gossip"}, None), ({"ids": ["d1", "d1"]}, b"x" * 128), ({}, b"x" * 63),
                         ({"sender": "aggregator"}, None), ({"ids": ["bad id!"]}, None),
                         ({"kinds": "b", "indices": [1]}, None), ({"ids": "d1"}, None)):
        bad = wire.encode(good.kind, {**good.header, **change}, good.body if body is None else body)
        with pytest.raises(ProtocolError):
            SecAggStage.parse(wire.decode(bad))
    with pytest.raises(ProtocolError, match="kind"):
        SecAggStage("job", 3, 1, "d2", "reveal", ("d1",), (bytes(32),), kinds="x", indices=(1,))


@pytest.mark.parametrize("sigma", [0.6, 1.5, 4.0])
def test_the_discrete_gaussian_sampler_has_its_distribution(sigma):
    """Chi-square of 200,000 draws against N_Z(0, sigma^2)'s mass function
    (bins with at least 20 expected draws; the rest pooled in the tails)."""
    from scipy import stats

    draws = discrete_gaussian(sigma, 200_000, np.random.default_rng(7))
    support = np.arange(-int(12 * sigma) - 1, int(12 * sigma) + 2)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma ** 2))
    pmf /= pmf.sum()
    expected = pmf * len(draws)
    inner = expected >= 20
    observed = np.array([np.count_nonzero(draws == k) for k in support])
    obs = np.append(observed[inner], observed[~inner].sum())
    exp = np.append(expected[inner], expected[~inner].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert np.abs(draws).max() <= 12 * sigma


def test_noisy_integers_stay_within_the_rounding_bound_and_the_modulus():
    """Conditional rounding keeps a clipped update's integer norm within
    ``rounding_bound``; the noise is cut at 12 deviations, so a plan's
    capacity of devices sums without wrapping, noise included; the sum of
    m shares carries m times a share's variance."""
    rng = np.random.default_rng(3)
    n, count = 40, 5_000
    p = SecAggPlan.for_devices(n, 3, 4, 12, 1.0, noise=30.0, aux_noise=5.0)
    assert p.capacity() >= n and p.peak == p.levels + 360
    x = rng.normal(size=count)
    x *= 1.0 / np.linalg.norm(x)  # clipped to the bound
    flat = np.append(x, 0.5)  # and a clip report
    total = np.zeros(count + 1, dtype=np.uint32)
    clean = np.zeros(count)
    for _ in range(n):
        q = quantize_noisy(flat, p, rng, count)
        total = (total + q) & np.uint32(p.mask)
        clean += x
    got = dequantize(total, p).astype(np.float64)
    noise = (got[:count] - clean) * p.scale
    assert noise.std() == pytest.approx(30.0 * np.sqrt(n), rel=0.05)  # rounding adds at most n / 4 per coordinate
    assert got[count] == pytest.approx(n * 0.5, abs=6 * 5.0 * np.sqrt(n) / p.scale)
    bare = SecAggPlan.for_devices(n, 3, 4, 12, 1.0)
    for _ in range(20):
        q = quantize_noisy(x, bare, rng, count).astype(np.int64)
        q = np.where(q > bare.mask // 2, q - (bare.mask + 1), q)
        assert np.linalg.norm(q) <= rounding_bound(bare.levels, count)
    assert ddgauss_tau(3.0, 300) < 1e-30 and ddgauss_tau(0.2, 300) > 1e-3


def test_an_input_or_share_not_made_by_the_protocol_fails_the_sum_instead_of_corrupting_it():
    """A masked input cannot be range-checked: a device may send any
    integers. The modulus's guard bits expose a sum no honest inputs make;
    so does a forged share (the self mask then comes off wrong and the sum is
    uniform). What passes moves the sum by at most the honest range."""
    p = plan()
    good = inputs_for(p, 8, seed=3)
    rng = np.random.default_rng(4)
    hostile = dict(good, d03=rng.integers(0, 1 << p.modulus_bits, COUNT, dtype=np.uint32))
    with pytest.raises(SecAggError, match="beyond"):
        run(p, hostile).result()
    server = run(p, good)
    for shares in server.revealed.values():  # d00's self-mask seed comes back wrong
        if "d00" in shares:
            kind, index, share = shares["d00"]
            shares["d00"] = (kind, index, bytes(b ^ 0x5A for b in share))
    with pytest.raises(SecAggError, match="beyond"):
        server.result()


def test_shares_that_do_not_combine_are_a_secagg_error_not_a_library_one():
    from fedge.secagg import SecAggError, _combine

    with pytest.raises(SecAggError, match="do not combine"):
        _combine({1: b"\x01" * 32, 2: b"\x02" * 31})  # PyCryptodome refuses shares of unequal length
