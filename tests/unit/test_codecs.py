"""Codecs: documented error bounds, unbiasedness, top-k selection, compact
indices, folding without a dense copy, hostile payloads, decompression bombs."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge import tensors
from fedge.codecs import CodecError, error_feedback, make_codec, parse_spec, requirements, supported
from fedge.codecs.packing import (
    indices_decode,
    indices_encode,
    pack_signed,
    unpack_signed,
    varint_decode,
    varint_encode,
)
from fedge.tensors import TensorError, TensorSpec

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12), elements=finite)

ALL = [
    {"name": "none"}, {"name": "fp16"}, {"name": "int8"}, {"name": "int8", "block": 64},
    {"name": "int4", "block": 64}, {"name": "int2", "block": 64}, {"name": "int2"},
    {"name": "topk", "fraction": 0.1}, {"name": "topk", "fraction": 0.3, "values": "fp16"},
    {"name": "topk", "fraction": 0.05, "values": "float32"},
    {"name": "int2", "block": 64, "lossless": "zlib"}, {"name": "topk", "fraction": 0.1, "lossless": "zlib"},
]
IDS = [str(c) for c in ALL]


def _delta(a):
    return {"layer.weight": a, "layer.bias": (a.reshape(-1)[:3] * 0.5).astype(np.float32)}


def roundtrip(spec_, d, seed=0):
    c = make_codec(spec_)
    return c.decode(c.encode(d, np.random.default_rng(seed)), TensorSpec.of(d))


# --- packing ---------------------------------------------------------------------


@given(bits=st.sampled_from([2, 4, 8]), data=st.data())
def test_signed_packing_round_trips(bits, data):
    lv = (1 << (bits - 1)) - 1
    q = np.array(data.draw(st.lists(st.integers(-lv, lv), max_size=300)), np.int8)
    packed = pack_signed(q, bits)
    assert len(packed) == -(-len(q) * bits // 8)
    np.testing.assert_array_equal(unpack_signed(packed, bits, len(q)), q)


@given(values=st.lists(st.integers(0, 2**62), max_size=200))
def test_varints_round_trip(values):
    v = np.array(values, dtype=np.uint64)
    np.testing.assert_array_equal(varint_decode(varint_encode(v), len(v)), v)


@given(size=st.integers(1, 5000), data=st.data())
def test_index_sets_round_trip_in_the_smaller_encoding(size, data):
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, size - 1), max_size=size))), dtype=np.int64)
    blob, mode = indices_encode(idx, size)
    assert len(blob) <= -(-size // 8) or mode == 0
    np.testing.assert_array_equal(indices_decode(blob, mode, len(idx), size), idx)


@pytest.mark.parametrize("blob,count", [(np.array([0x80], np.uint8), 1), (np.array([1, 2], np.uint8), 1),
                                        (np.array([0xFF] * 10 + [1], np.uint8), 1)])
def test_malformed_varints_are_refused(blob, count):
    with pytest.raises(CodecError):
        varint_decode(blob, count)


def test_indices_outside_the_tensor_are_refused():
    blob, mode = indices_encode(np.array([3, 9]), 10)
    with pytest.raises(CodecError):
        indices_decode(blob, mode, 2, 5)


# --- error bounds and bias ----------------------------------------------------------


@given(a=arrays)
def test_none_is_exact(a):
    d = _delta(a)
    out = roundtrip("none", d)
    for k in d:
        np.testing.assert_array_equal(out[k], d[k])


@given(a=arrays)
def test_fp16_is_within_half_precision(a):
    d = _delta(a)
    out = roundtrip("fp16", d)
    for k, x in d.items():
        assert np.all(np.abs(out[k] - x) <= np.abs(x) * 2**-11 + 6e-8)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", [0, 64])
@settings(max_examples=30)
@given(a=arrays, seed=st.integers(0, 2**32 - 1))
def test_quantized_error_is_below_one_step_of_its_block(bits, block, a, seed):
    d = _delta(a)
    out = roundtrip({"name": f"int{bits}", "block": block}, d, seed)
    lv = (1 << (bits - 1)) - 1
    for k, x in d.items():
        flat, got = x.reshape(-1), out[k].reshape(-1)
        width = block or max(len(flat), 1)
        for start in range(0, len(flat), width):
            seg = slice(start, start + width)
            step = np.abs(flat[seg]).max() / lv
            assert np.all(np.abs(got[seg] - flat[seg]) <= step * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("spec_", [{"name": "int8"}, {"name": "int4", "block": 64}, {"name": "int2", "block": 64}])
def test_quantizers_are_unbiased(spec_):
    rng = np.random.default_rng(1234)
    x = {"w": rng.normal(size=2048).astype(np.float32)}
    c, spec, n = make_codec(spec_), TensorSpec.of(x), 1500
    mean = np.zeros(2048)
    for _ in range(n):
        mean += c.decode(c.encode(x, rng), spec)["w"]
    mean /= n
    # One draw errs by less than one step s with std <= s/2; the mean of n
    # draws has std <= s/(2 sqrt n). 6 sigma over 2048 entries cannot flake.
    lv = {"int8": 127, "int4": 7, "int2": 1}[spec_["name"]]
    block = spec_.get("block") or 2048
    step = np.repeat(np.abs(x["w"]).reshape(-1, block).max(axis=1) / lv, block)
    assert np.all(np.abs(mean - x["w"]) < 6 * step / (2 * np.sqrt(n)))
    # Round-to-nearest would fail the same test.
    nearest = np.round(x["w"] / step) * step
    assert not np.all(np.abs(nearest - x["w"]) < 6 * step / (2 * np.sqrt(n)))


@settings(max_examples=40)
@given(a=arrays, fraction=st.floats(0.01, 1.0))
def test_topk_keeps_exactly_the_largest_entries(a, fraction):
    d = {"w": a}
    out = roundtrip({"name": "topk", "fraction": fraction, "values": "float32"}, d)["w"].reshape(-1)
    flat = a.reshape(-1)
    k = max(1, int(np.ceil(fraction * flat.size)))
    kept = np.flatnonzero(out != 0)
    assert len(kept) <= k
    np.testing.assert_array_equal(out[kept], flat[kept])
    if len(kept):  # nothing dropped is larger than anything kept
        dropped = np.setdiff1d(np.arange(flat.size), kept)
        if len(dropped):
            assert np.abs(flat[dropped]).max() <= np.abs(flat[kept]).min() + 1e-6 or len(kept) < k


# --- folding -------------------------------------------------------------------


@pytest.mark.parametrize("spec_", ALL, ids=IDS)
@settings(max_examples=15)
@given(a=arrays, w=st.floats(0.1, 100))
def test_fold_equals_decode_then_add(spec_, a, w):
    c = make_codec(spec_)
    d = _delta(a)
    spec = TensorSpec.of(d)
    body = c.encode(d, np.random.default_rng(7))
    dense = c.decode(body, spec)
    acc = {k: np.ones(v.shape, np.float32) for k, v in d.items()}
    c.fold(body, spec, acc, w)
    for k in d:
        np.testing.assert_allclose(acc[k], 1 + w * dense[k], rtol=1e-5, atol=1e-3)


# --- hostile input -------------------------------------------------------------------


GOOD = {"w": np.linspace(-1, 1, 96, dtype=np.float32).reshape(8, 12), "b": np.arange(4, dtype=np.float32)}
SPEC = TensorSpec.of(GOOD)


def _hostile(spec_):
    c = make_codec(spec_)
    body = c.encode(GOOD, np.random.default_rng(0))
    yield "truncated", body[: len(body) // 2]
    yield "garbage", b"\x00" * 64
    yield "empty", b""
    yield "wrong shape", c.encode({"w": np.ones((12, 8), np.float32), "b": GOOD["b"]}, np.random.default_rng(0))
    yield "missing tensor", c.encode({"w": GOOD["w"]}, np.random.default_rng(0))
    if "lossless" in spec_:
        yield "bomb", zlib.compress(b"\x00" * (64 << 20))
        return
    parts = {k: np.array(v) for k, v in tensors.unpack(body).items()}
    for key in sorted(parts):
        arr = parts[key]
        if arr.dtype == np.float32 and key.startswith("s/"):
            yield f"nan scale {key}", tensors.pack({**parts, key: np.full_like(arr, np.nan)})
        if arr.dtype in (np.float32, np.float16) and not key.startswith("s/"):
            yield f"nan {key}", tensors.pack({**parts, key: np.full_like(arr, np.nan)})
        if key.startswith("q/") and spec_["name"] != "int8":
            yield f"code out of range {key}", tensors.pack({**parts, key: np.full_like(arr, 0xFF)})
        if key.startswith("i/"):
            yield f"indices {key}", tensors.pack({**parts, key: np.full(len(arr) + 3, 0x7F, np.uint8)})
        if key.startswith("m/"):
            yield f"index mode {key}", tensors.pack({**parts, key: np.array([9], np.uint8)})
        yield f"wrong dtype {key}", tensors.pack({**parts, key: arr.astype(np.float64)})


@pytest.mark.parametrize("spec_", ALL, ids=IDS)
def test_hostile_payloads_are_rejected_and_leave_the_sum_untouched(spec_):
    c = make_codec(spec_)
    for label, body in _hostile(spec_):
        acc = {"w": np.full((8, 12), 5.0, np.float32), "b": np.full(4, 5.0, np.float32)}
        with pytest.raises((CodecError, TensorError)):
            c.fold(body, SPEC, acc, 1.0)
        assert all(np.all(v == 5.0) for v in acc.values()), label


def test_unknown_codecs_and_parameters_are_named():
    with pytest.raises(CodecError, match="unknown codec 'zip9'"):
        make_codec("zip9")
    for bad in ({"name": "int8", "bits": 3}, {"name": "int4", "block": 7}, {"name": "topk", "fraction": 0},
                {"name": "topk", "values": "int3"}, {"name": "int8", "lossless": "rar"}):
        with pytest.raises(CodecError):
            make_codec(bad)


def test_specs_typed_by_users_parse_or_name_the_problem():
    assert parse_spec("int8") == {"name": "int8"}
    assert parse_spec('{"name": "topk", "fraction": 0.05}') == {"name": "topk", "fraction": 0.05}
    with pytest.raises(CodecError, match="not valid JSON"):
        parse_spec('{"name": int8}')
    with pytest.raises(CodecError, match="unknown codec"):
        parse_spec("int9")


# --- what devices and jobs agree on -----------------------------------------------------


def test_error_feedback_is_on_for_biased_codecs_unless_said_otherwise():
    assert error_feedback({"name": "topk", "fraction": 0.01})
    assert not error_feedback({"name": "int8"})
    assert not error_feedback({"name": "topk", "fraction": 0.01, "ef": False})
    assert error_feedback({"name": "int2", "ef": True})


def test_devices_advertise_what_jobs_require():
    assert set(requirements({"name": "topk", "fraction": 0.01, "lossless": "zlib"})) <= set(supported())


def test_compression_ratios_on_a_2nn_sized_delta():
    rng = np.random.default_rng(0)
    d = {"w1": rng.normal(size=(200, 784)).astype(np.float32), "w2": rng.normal(size=(200, 200)).astype(np.float32)}
    f32 = len(make_codec("none").encode(d, rng))
    ratio = {str(s): f32 / len(make_codec(s).encode(d, rng)) for s in (
        "fp16", "int8", {"name": "int4", "block": 256}, {"name": "int2", "block": 256},
        {"name": "topk", "fraction": 0.01})}
    assert 1.99 < ratio["fp16"] < 2.01 and 3.9 < ratio["int8"] < 4.01
    assert 7.5 < ratio[str({"name": "int4", "block": 256})] < 8
    assert 14.5 < ratio[str({"name": "int2", "block": 256})] < 16
    assert ratio[str({"name": "topk", "fraction": 0.01})] > 100
