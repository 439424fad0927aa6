"""The error taxonomy, and how an error's text is shown: one line.

Every error fedge raises for something it refuses derives from
``FedgeError``, which carries a short machine-readable ``reason`` (a
counter's label, a receipt's status) and, as its message, the one-line
detail a person reads:

    FedgeError
    +-- WireError       a payload that is not a well-formed fedge message (fedge.wire)
    +-- ProtocolError   a well-formed envelope whose header breaks the protocol (fedge.messages)
    +-- ChunkError      a chunk stream that cannot be reassembled (fedge.chunks)
    +-- TensorError     tensors that are malformed or do not fit the model (fedge.tensors)
    +-- CodecError      an update body a codec cannot accept (fedge.codecs)
    +-- ConfigError     a config key with a bad value (fedge.config)
    +-- ImportSpecError a module:callable that cannot be found (fedge.imports)
    +-- OnnxModelError  an ONNX file that cannot be loaded or fed (fedge.onnxrt)
    +-- SecAggError     a secure-aggregation step that cannot go on (fedge.secagg)

Roles add their own below it (the export toolchain's ``ExportError``).
``one_line`` is what every boundary that turns a library's exception (ONNX
Runtime, the ONNX checker, torch.export) into one of ours uses, so that such
a line never carries ANSI colour codes, never spans lines and is never cut
in the middle of a word. This module imports nothing from fedge.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class FedgeError(ValueError):
    """Something fedge refuses. ``reason`` is a short tag for counters and
    receipts; ``str(err)`` is the one-line detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class OneReasonError(FedgeError):
    """An error whose reason is always the same (``default_reason``), raised
    with the detail only: ``ConfigError("job.rounds must be at least 1")``."""

    default_reason = "invalid"

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(reason or self.default_reason, detail)


def one_line(text: object, limit: int = 240) -> str:
    """``text`` on one line: colour codes dropped, whitespace runs folded, and
    cut at a word boundary (with an ellipsis) when longer than ``limit``."""
    flat = " ".join(_ANSI.sub("", str(text)).split())
    if len(flat) <= limit:
        return flat
    cut = flat[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message (its type name if it has
    none), through ``one_line``."""
    text = _ANSI.sub("", str(exc)).strip()
    return one_line(text.splitlines()[0] if text else type(exc).__name__, limit)
