"""Streaming fold and server optimizers against a plain NumPy reference."""

import numpy as np
import pytest

from aggregator.config import ServerSection
from aggregator.fold import RunningSum
from aggregator.optimizers import make_server_optimizer
from fedge.codecs import make_codec
from fedge.tensors import TensorSpec

rng = np.random.default_rng(42)
SHAPES = {"a": (4, 3), "b": (3,)}
SPEC = TensorSpec(tuple(SHAPES.items()))


def rand():
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def test_streaming_fold_is_the_weighted_mean():
    deltas = [rand() for _ in range(7)]
    weights = rng.integers(1, 500, size=7).astype(float)
    s = RunningSum(SPEC)
    codec = make_codec("none")
    for d, w in zip(deltas, weights, strict=False):
        s.fold(codec, codec.encode(d, rng), w)
    mean = s.mean()
    for k in SHAPES:
        ref = np.average(np.stack([d[k] for d in deltas]), axis=0, weights=weights)
        np.testing.assert_allclose(mean[k], ref, rtol=1e-6, atol=1e-6)
    s.reset()
    assert s.count == 0 and s.total_weight == 0 and all(np.all(v == 0) for v in s.acc.values())


def test_fold_refuses_non_positive_weight():
    with pytest.raises(ValueError):
        RunningSum(SPEC).fold(make_codec("none"), make_codec("none").encode(rand(), rng), 0.0)


def _run(name, steps, **kw):
    opt = make_server_optimizer(ServerSection(optimizer=name, **kw))
    w = rand()
    for d in steps:
        w = opt.step(w, d)
    return opt, w


def test_fedavg_adds_lr_times_the_mean_delta():
    w, d = rand(), rand()
    out = make_server_optimizer(ServerSection(optimizer="fedavg", lr=0.5)).step(w, d)
    for k in w:
        np.testing.assert_allclose(out[k], w[k] + 0.5 * d[k], rtol=1e-6)


def test_fedavgm_matches_reference():
    w0, ds = rand(), [rand() for _ in range(4)]
    opt = make_server_optimizer(ServerSection(optimizer="fedavgm", lr=0.7, momentum=0.9))
    w, ref, m = w0, {k: v.astype(np.float64) for k, v in w0.items()}, {k: 0.0 for k in w0}
    for d in ds:
        w = opt.step(w, d)
        for k in ref:
            m[k] = 0.9 * m[k] + d[k]
            ref[k] = ref[k] + 0.7 * m[k]
    for k in w:
        np.testing.assert_allclose(w[k], ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_match_reddi_et_al(name):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.05
    w0, ds = rand(), [rand() for _ in range(5)]
    opt = make_server_optimizer(ServerSection(optimizer=name, lr=lr, beta1=b1, beta2=b2, tau=tau))
    w = w0
    ref = {k: v.astype(np.float64) for k, v in w0.items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, tau**2) for k, s in SHAPES.items()}
    for d in ds:
        w = opt.step(w, d)
        for k in ref:
            dk = d[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * dk
            if name == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * dk**2
            else:
                v[k] = v[k] - (1 - b2) * dk**2 * np.sign(v[k] - dk**2)
            ref[k] = ref[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    for k in w:
        np.testing.assert_allclose(w[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_optimizer_state_survives_a_checkpoint(name):
    ds = [rand() for _ in range(4)]
    w0 = rand()
    straight = make_server_optimizer(ServerSection(optimizer=name))
    a = w0
    for d in ds:
        a = straight.step(a, d)
    first = make_server_optimizer(ServerSection(optimizer=name))
    b = first.step(first.step(w0, ds[0]), ds[1])
    second = make_server_optimizer(ServerSection(optimizer=name))
    second.load_state({slot: {k: v.copy() for k, v in named.items()} for slot, named in first.state().items()})
    b = second.step(second.step(b, ds[2]), ds[3])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown server optimizer 'sgd9'"):
        make_server_optimizer(ServerSection(optimizer="sgd9"))
