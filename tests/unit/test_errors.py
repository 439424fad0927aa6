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


def test_every_refusal_derives_from_one_root_with_a_reason():
    from export.errors import ExportError
    from fedge.chunks import ChunkError
    from fedge.codecs import CodecError
    from fedge.config import ConfigError
    from fedge.errors import FedgeError
    from fedge.imports import ImportSpecError
    from fedge.messages import ProtocolError
    from fedge.onnxrt import OnnxModelError
    from fedge.secagg import SecAggError
    from fedge.tensors import TensorError
    from fedge.wire import WireError

    for cls in (WireError, ProtocolError, ChunkError, TensorError, CodecError):
        err = cls("checksum", "payload digest does not match")
        assert isinstance(err, FedgeError) and err.reason == "checksum"
        assert str(err) == "payload digest does not match"
    for cls, reason in ((ConfigError, "config"), (ImportSpecError, "import"), (OnnxModelError, "onnx_model"),
                        (ExportError, "export"), (SecAggError, "secagg_failed")):
        err = cls("one line naming the fix")
        assert isinstance(err, FedgeError) and err.reason == reason and str(err) == "one line naming the fix"
    # Siblings, not parent and child: catching one never silently catches another.
    assert not issubclass(ProtocolError, WireError) and not issubclass(CodecError, TensorError)
