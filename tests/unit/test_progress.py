"""Progress lines: drawn on a terminal, erased when the work ends, and nothing
at all when the output is not a terminal."""

from __future__ import annotations

import io
import threading

from fedge.progress import Progress, interactive


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_or_file_gets_nothing():
    out = io.StringIO()
    assert not interactive(out)
    with Progress("calibrating", 100, unit="rows", stream=out) as p:
        p.advance(50)
    assert out.getvalue() == ""


def test_a_terminal_sees_one_redrawn_line_that_is_erased_at_the_end():
    out = Tty()
    with Progress("evaluating int8", 200, unit="examples", stream=out, interval=0) as p:
        p.advance(50)
        assert out.getvalue().split("\r")[-1].startswith("evaluating int8: 50/200 examples (25%)")
        p.set(note="waiting")
        assert "waiting" in out.getvalue().split("\r")[-1]
    text = out.getvalue()
    assert "\n" not in text
    assert text.endswith("\r") and text.split("\r")[-2].strip() == ""  # erased


def test_a_line_closed_from_another_thread_is_not_drawn_again():
    out = Tty()
    p = Progress("round 1", stream=out, interval=0)
    p.set(note="3/10 agents online")
    t = threading.Thread(target=p.close)
    t.start()
    t.join()
    before = out.getvalue()
    p.set(note="late")
    assert out.getvalue() == before and not p.enabled
