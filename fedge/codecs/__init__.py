"""Update codecs: how a model delta becomes few bytes, and back.

The job picks the codec and announces it with every round (``params()`` of a
codec); the device never guesses. ``make_codec`` is the one way to build a
codec from such a description, and ``CODECS`` lists the names this build
understands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedge.codecs.base import CodecError, UpdateCodec
from fedge.codecs.dense import Float32Codec
from fedge.codecs.quantized import Int8Codec

CODECS: dict[str, Callable[..., UpdateCodec]] = {
    Float32Codec.name: Float32Codec,
    Int8Codec.name: Int8Codec,
}

__all__ = ["CODECS", "CodecError", "UpdateCodec", "make_codec"]


def make_codec(spec: str | Mapping[str, Any]) -> UpdateCodec:
    """Build a codec from its name or its announced parameters."""
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name", None)
    if name not in CODECS:
        raise CodecError("codec", f"unknown codec {name!r}; this build knows {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as exc:
        raise CodecError("codec", f"bad parameters for codec {name!r}: {exc}") from None
