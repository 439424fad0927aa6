"""``--log-format json``: one object per line with the fields operators filter on."""

from __future__ import annotations

import json
import logging
import os

from fedge import logs
from fedge.logs import JsonFormatter, fields


def _record(msg, *args, exc_info=None, **extra):
    record = logging.LogRecord("aggregator.rounds", logging.WARNING, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_a_line_is_one_json_object_with_the_named_fields():
    line = JsonFormatter().format(_record("dropped message from %s: %s (%s)", "pi-7", "trained from another",
                                          "stale_base", **fields(device="pi-7", reason="stale_base", round=12,
                                                                 status=None)))
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "warning" and out["logger"] == "aggregator.rounds"
    assert out["message"] == "dropped message from pi-7: trained from another (stale_base)"
    assert (out["device"], out["reason"], out["round"]) == ("pi-7", "stale_base", 12)
    assert "status" not in out and out["time"].endswith("Z") and "T" in out["time"]


def test_an_exception_travels_inside_the_object_and_odd_values_become_text():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = _record("failed: %s", "x", exc_info=sys.exc_info(), device=object())
    out = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in out["exception"] and isinstance(out["device"], str)


def test_setup_passes_the_format_on_to_child_processes(monkeypatch, capsys):
    monkeypatch.delenv("FEDGE_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("INFO", "json")
        assert os.environ["FEDGE_LOG_FORMAT"] == "json"
        logging.getLogger("fedge.test").info("hello %s", "there", extra=fields(device="d1"))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(err)["message"] == "hello there" and json.loads(err)["device"] == "d1"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
