"""Update codecs: how a model delta becomes few bytes, and back.

The job picks the codec and announces it with every round (a dict such as
``{"name": "topk", "fraction": 0.01, "values": "int8", "lossless": "zlib"}``);
the device never guesses, and echoes the dict in its update's header.
``make_codec`` is the one way to build a codec from it.

Keys every codec dict may carry besides the codec's own parameters:
``lossless`` (``zlib``/``zstd``: a lossless stage on top) and ``ef`` (error
feedback on the device; defaults to on for biased codecs such as ``topk``).

| name | bits per parameter | unbiased |
| --- | --- | --- |
| none | 32 | yes (exact) |
| fp16 | 16 | nearly (round to nearest) |
| int8 / int4 / int2 | 8 / 4 / 2 plus 32 per block | yes |
| topk | ~(8 + index) * fraction | no: use error feedback |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedge.codecs.base import CodecError, UpdateCodec
from fedge.codecs.dense import Float16Codec, Float32Codec
from fedge.codecs.lossless import METHODS as LOSSLESS_METHODS
from fedge.codecs.lossless import LosslessCodec
from fedge.codecs.quantized import QuantizedCodec
from fedge.codecs.sparse import TopKCodec

CODECS: dict[str, Callable[..., UpdateCodec]] = {
    "none": Float32Codec,
    "fp16": Float16Codec,
    "int8": lambda **kw: QuantizedCodec(8, **kw),
    "int4": lambda **kw: QuantizedCodec(4, **kw),
    "int2": lambda **kw: QuantizedCodec(2, **kw),
    "topk": TopKCodec,
}

__all__ = ["CODECS", "CodecError", "UpdateCodec", "error_feedback", "make_codec", "parse_spec", "requirements",
           "supported"]


def _split(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name", None)
    lossless = params.pop("lossless", None)
    params.pop("ef", None)
    if name not in CODECS:
        raise CodecError("codec", f"unknown codec {name!r}; this build knows {sorted(CODECS)}")
    return name, params, lossless


def parse_spec(text: str) -> dict[str, Any]:
    """A codec spec as a user types it: a name (``int8``) or a JSON object
    (``{"name": "topk", "fraction": 0.05}``). Checked by building the codec;
    raises ``CodecError`` naming the problem."""
    import json

    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise CodecError("codec", f"codec spec is not valid JSON ({exc}); e.g. '{{\"name\": \"int8\"}}'") from None
    else:
        spec = {"name": text.strip()}
    make_codec(spec)
    return dict(spec)


def make_codec(spec: str | Mapping[str, Any]) -> UpdateCodec:
    """Build a codec from its name or its announced parameters."""
    name, params, lossless = _split(spec)
    try:
        codec = CODECS[name](**params)
    except TypeError as exc:
        raise CodecError("codec", f"bad parameters for codec {name!r}: {exc}") from None
    return LosslessCodec(codec, lossless) if lossless else codec


def error_feedback(spec: str | Mapping[str, Any]) -> bool:
    """Whether devices keep the compression error and add it to their next
    delta: the ``ef`` key if given, else on for biased codecs."""
    if isinstance(spec, Mapping) and "ef" in spec:
        return bool(spec["ef"])
    return not make_codec(spec).unbiased


def supported() -> list[str]:
    """What this build can decode, as a device advertises it."""
    return sorted(CODECS) + [f"lossless:{m}" for m in LOSSLESS_METHODS]


def requirements(spec: str | Mapping[str, Any]) -> list[str]:
    """What a device must advertise to take part with this codec."""
    name, _, lossless = _split(spec)
    return [name] + ([f"lossless:{lossless}"] if lossless else [])
