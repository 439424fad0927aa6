"""Codecs: documented error bounds, unbiasedness, folding, hostile payloads."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge import tensors
from fedge.codecs import CODECS, CodecError, make_codec
from fedge.tensors import TensorError, TensorSpec

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12), elements=finite)


def _delta(a):
    return {"layer.weight": a, "layer.bias": (a.reshape(-1)[:3] * 0.5).astype(np.float32)}


@given(a=arrays)
def test_none_is_exact(a):
    c = make_codec("none")
    d = _delta(a)
    out = c.decode(c.encode(d, np.random.default_rng(0)), TensorSpec.of(d))
    for k in d:
        np.testing.assert_array_equal(out[k], d[k])


@given(a=arrays, seed=st.integers(0, 2**32 - 1))
def test_int8_error_is_below_one_step(a, seed):
    c = make_codec("int8")
    d = _delta(a)
    out = c.decode(c.encode(d, np.random.default_rng(seed)), TensorSpec.of(d))
    for k, x in d.items():
        step = np.abs(x).max() / 127 if x.size else 0
        assert np.all(np.abs(out[k] - x) <= step * (1 + 1e-5) + 1e-30)


def test_int8_is_unbiased():
    rng = np.random.default_rng(1234)
    x = {"w": rng.normal(size=2000).astype(np.float32)}
    step = np.abs(x["w"]).max() / 127
    c, spec, n = make_codec("int8"), TensorSpec.of(x), 1000
    mean = np.zeros(2000)
    for _ in range(n):
        mean += c.decode(c.encode(x, rng), spec)["w"]
    mean /= n
    # One draw errs by at most one step with std <= step/2; the mean of n
    # draws has std <= step/(2 sqrt n). 6 sigma over 2000 elements cannot flake.
    assert np.abs(mean - x["w"]).max() < 6 * step / (2 * np.sqrt(n))
    # A biased (round-to-nearest) quantizer would fail the same test.
    nearest = np.round(x["w"] / step) * step
    assert np.abs(nearest - x["w"]).max() > 6 * step / (2 * np.sqrt(n))


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=25)
@given(a=arrays, w=st.floats(0.1, 100))
def test_fold_equals_decode_then_add(name, a, w):
    c = make_codec(name)
    d = _delta(a)
    spec = TensorSpec.of(d)
    body = c.encode(d, np.random.default_rng(7))
    dense = c.decode(body, spec)
    acc = {k: np.ones(v.shape) for k, v in d.items()}
    c.fold(body, spec, acc, w)
    for k in d:
        np.testing.assert_allclose(acc[k], 1 + w * dense[k].astype(np.float64), rtol=1e-5, atol=1e-4)


def _hostile_bodies(name):
    good = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    c = make_codec(name)
    body = c.encode(good, np.random.default_rng(0))
    yield "truncated", body[: len(body) // 2]
    yield "garbage", b"\x00" * 64
    yield "empty", b""
    yield "wrong shape", c.encode({"w": np.ones((2, 3), np.float32), "b": np.zeros(2, np.float32)},
                                  np.random.default_rng(0))
    yield "missing tensor", c.encode({"w": np.ones((3, 2), np.float32)}, np.random.default_rng(0))
    if name == "none":
        yield "nan", tensors.pack({"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)})
        yield "float64", tensors.pack({"w": np.ones((3, 2)), "b": np.zeros(2)})
    if name == "int8":
        yield "nan scale", tensors.pack({"q/w": np.ones((3, 2), np.int8), "s/w": np.array(np.nan, np.float32),
                                         "q/b": np.ones(2, np.int8), "s/b": np.array(1, np.float32)})
        yield "int16 values", tensors.pack({"q/w": np.ones((3, 2), np.int16), "s/w": np.array(1, np.float32),
                                            "q/b": np.ones(2, np.int8), "s/b": np.array(1, np.float32)})


@pytest.mark.parametrize("name", sorted(CODECS))
def test_hostile_payloads_are_rejected_and_leave_the_sum_untouched(name):
    spec = TensorSpec((("w", (3, 2)), ("b", (2,))))
    c = make_codec(name)
    for label, body in _hostile_bodies(name):
        acc = {"w": np.full((3, 2), 5.0), "b": np.full(2, 5.0)}
        with pytest.raises((CodecError, TensorError)):
            c.fold(body, spec, acc, 1.0)
        assert all(np.all(v == 5.0) for v in acc.values()), label


def test_unknown_codec_is_named():
    with pytest.raises(CodecError, match="unknown codec 'zip9'"):
        make_codec("zip9")
    with pytest.raises(CodecError):
        make_codec({"name": "int8", "bits": 3})


def test_int8_is_four_times_smaller_than_float32():
    d = {"w": np.random.default_rng(0).normal(size=(200, 784)).astype(np.float32)}
    f32 = len(make_codec("none").encode(d, np.random.default_rng(0)))
    i8 = len(make_codec("int8").encode(d, np.random.default_rng(0)))
    assert f32 / i8 > 3.9
