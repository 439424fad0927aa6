"""The export toolchain's view of the input signature (``fedge.signature``):
the same specs, parsed with the toolchain's ``ExportError``."""

from __future__ import annotations

from collections.abc import Sequence

from export.errors import ExportError
from fedge import signature
from fedge.signature import BATCH_DIM, DTYPES, InputSpec, SignatureError, dynamic_sizes, examples

__all__ = ["BATCH_DIM", "DTYPES", "InputSpec", "dynamic_sizes", "examples", "parse_input_spec", "parse_input_specs"]


def parse_input_spec(text: str) -> InputSpec:
    try:
        return signature.parse_input_spec(text)
    except SignatureError as exc:
        raise ExportError(str(exc)) from None


def parse_input_specs(texts: Sequence[str]) -> list[InputSpec]:
    try:
        return signature.parse_input_specs(texts)
    except SignatureError as exc:
        raise ExportError(str(exc)) from None
