"""The envelope: round trips, and every corruption is rejected with a reason."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge import wire
from fedge.wire import Kind, WireError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
kinds = st.sampled_from(list(Kind))


@given(kind=kinds, header=headers, body=st.binary(max_size=3000))
def test_round_trip(kind, header, body):
    msg = wire.encode(kind, header, body)
    env = wire.decode(msg)
    assert env.kind == kind
    assert env.header == json.loads(json.dumps(header))
    assert env.body == body
    assert env.digest == wire.digest_of(msg)
    assert env.size == len(msg)


@settings(max_examples=60)
@given(header=headers, body=st.binary(min_size=1, max_size=200), data=st.data())
def test_any_bit_flip_is_rejected(header, body, data):
    msg = bytearray(wire.encode(Kind.UPDATE, header, body))
    pos = data.draw(st.integers(0, len(msg) - 1))
    msg[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(WireError):
        wire.decode(bytes(msg))


@given(body=st.binary(max_size=500), data=st.data())
def test_truncation_is_rejected(body, data):
    msg = wire.encode(Kind.MODEL, {"job": "j"}, body)
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(WireError) as err:
        wire.decode(msg[:cut])
    assert err.value.reason in ("truncated", "malformed")


@given(junk=st.binary(max_size=300))
def test_junk_is_rejected(junk):
    with pytest.raises(WireError):
        wire.decode(junk)


def test_unknown_version_names_both_versions():
    msg = bytearray(wire.encode(Kind.STATUS, {"x": 1}))
    msg[4] = 2
    with pytest.raises(WireError) as err:
        wire.decode(bytes(msg))
    assert err.value.reason == "version"
    assert "wire version 2" in str(err.value) and "speaks 1" in str(err.value)


def test_lengths_are_bounded_before_allocation():
    # A preamble that claims a 2 GB body is refused from its 52 bytes alone.
    pre = struct.pack("<4sBBHIQ32s", b"FEDG", 1, 3, 0, 2, 2 << 30, bytes(32))
    with pytest.raises(WireError) as err:
        wire.decode(pre + b"{}", max_body=1 << 20)
    assert err.value.reason == "oversized"


def test_header_must_be_an_object_without_nan():
    good = wire.encode(Kind.EVENT, {"a": 1})
    env = wire.decode(good)
    assert env.header == {"a": 1}
    with pytest.raises(ValueError):
        wire.encode(Kind.EVENT, {"a": float("nan")})
