"""How an error's text is shown to a user: one line.

Owns ``one_line``, which every boundary that turns a library's exception
(ONNX Runtime, the ONNX checker, torch.export) into our own one-line error
uses, so that such a line never carries ANSI colour codes, never spans
lines and is never cut in the middle of a word.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


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
