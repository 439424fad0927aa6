"""Log set-up shared by the command line and the processes it starts, and
the structured fields an operator filters on.

``--log-format json`` writes one JSON object per line: ``time`` (UTC,
ISO 8601), ``level``, ``logger``, ``message``, and, where the line is about
one, ``job``, ``round``, ``device``, ``reason`` and ``status``; an exception
adds ``exception`` (its traceback). Log calls name those fields with
``extra=fields(round=..., device=..., reason=...)``; the text format shows
the message only, which already says them in words.

Child processes (the training worker, the export run by the aggregator)
read the level and format from ``FEDGE_LOG_LEVEL`` and ``FEDGE_LOG_FORMAT``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

FORMATS = ("text", "json")
FIELDS = ("job", "round", "attempt", "device", "reason", "status")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fields(**values: Any) -> dict[str, Any]:
    """The ``extra`` of a log call: the structured fields that are not None."""
    return {k: v for k, v in values.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str | None = None, fmt: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (default: the environment's,
    else INFO and text), and pass both on to child processes."""
    level = (level or os.environ.get("FEDGE_LOG_LEVEL") or "INFO").upper()
    fmt = fmt or os.environ.get("FEDGE_LOG_FORMAT") or "text"
    if fmt not in FORMATS:
        fmt = "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))
    logging.captureWarnings(True)  # a library's warning is a log line too, in the same format
    os.environ.setdefault("FEDGE_LOG_LEVEL", level)  # a level set for the children stays theirs
    os.environ["FEDGE_LOG_FORMAT"] = fmt
