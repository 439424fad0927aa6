"""A library's error text becomes one readable line: no colour codes, no
line breaks, never cut in the middle of a word."""

from fedge.errors import first_line, one_line


def test_one_line_drops_colour_codes_and_folds_whitespace():
    assert one_line("\x1b[1;31mboom\x1b[m:\n  bad   input\n") == "boom: bad input"


def test_one_line_cuts_at_a_word_boundary():
    text = "indices element out of data bounds, idx=12 must be within the inclusive range " * 5
    line = one_line(text, 100)
    assert len(line) <= 100 and line.endswith("…")
    assert text.startswith(line[:-1]) and text[len(line) - 1] in " ,"


def test_first_line_of_an_exception():
    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(IndexError()) == "IndexError"
