"""The tensor payload reader: safetensors, zero-copy, and strict about bounds."""

import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save

from fedge import tensors
from fedge.tensors import TensorError, TensorSpec

dtypes = st.sampled_from([np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64])
named_arrays = st.dictionaries(
    st.text("abcdefghij./_0123456789", min_size=1, max_size=12),
    dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))),
    max_size=6,
)


@given(arrays=named_arrays)
def test_reads_what_safetensors_writes(arrays):
    out = tensors.unpack(save(arrays))
    assert set(out) == set(arrays)
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)


def test_arrays_are_views_of_the_payload_not_copies():
    data = tensors.pack({"w": np.arange(1000, dtype=np.float32)})
    w = tensors.unpack(data)["w"]
    assert not w.flags.writeable and not w.flags.owndata


def _forge(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x00",
        struct.pack("<Q", 10**12) + b"{}",
        _forge({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8),  # past the end
        _forge({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\x00" * 12),  # size mismatch
        _forge({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),  # overlap
        _forge({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8),  # gap
        _forge({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 8),  # trailing bytes
        _forge({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
        _forge({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4),
        _forge({"a": "nonsense"}, b""),
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 3) + b"\xff\xfe{",
    ],
)
def test_hostile_payloads_are_refused(payload):
    with pytest.raises(TensorError):
        tensors.unpack(payload)


def test_spec_checks_names_and_shapes():
    spec = TensorSpec((("w", (2, 3)), ("b", (3,))))
    spec.check({"w": np.zeros((2, 3)), "b": np.zeros(3)})
    with pytest.raises(TensorError, match="shape"):
        spec.check({"w": np.zeros((3, 2)), "b": np.zeros(3)})
    with pytest.raises(TensorError, match="missing"):
        spec.check({"w": np.zeros((2, 3))})
    assert TensorSpec.from_json(spec.to_json()) == spec and spec.num_params == 9
