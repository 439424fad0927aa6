"""Key models and deltas: how the global model reaches devices cheaply.

Every ``key_every`` rounds the aggregator publishes a key model (the full
float32 model). Every other round it publishes the current model as a change
from that key, encoded with the downlink codec. The change is cumulative
since the key, so one retained delta takes any device holding the key to the
current model, however many rounds it missed. A device without the key takes
the retained key first.

``rebuild`` is the one definition of "key plus delta" both roles use, so the
model a device reconstructs is bit-for-bit the model the aggregator
announced; the device checks the state digest before training on it.

The aggregator keeps its own exact model: each round's delta is the exact
model minus the key, quantized afresh, so downlink quantization error never
accumulates from round to round.
"""

from __future__ import annotations

import numpy as np

from fedge.codecs import UpdateCodec
from fedge.tensors import ModelArrays, TensorSpec


def encode_delta(target: ModelArrays, key: ModelArrays, codec: UpdateCodec, rng: np.random.Generator) -> bytes:
    return codec.encode({k: (target[k] - key[k]).astype(np.float32) for k in key}, rng)


def rebuild(key: ModelArrays, codec: UpdateCodec, body: bytes, spec: TensorSpec) -> ModelArrays:
    """key + decode(body), computed the same way on every machine. Raises
    the codec's error for a body that does not fit ``spec``."""
    model = {name: np.array(key[name], dtype=np.float32, copy=True) for name in spec.names}
    codec.fold(body, spec, model, 1.0)
    return model
