"""The two ways an export-toolchain command can fail.

``ExportError`` is a user mistake (bad import path, wrong shape, missing
file, unsupported operator): one line that names the problem and the fix;
the CLI prints it without a traceback and exits 2.

``QualityError`` is a run that worked but whose result is not good enough
(ONNX disagrees with PyTorch beyond tolerance, the quantized model lost too
much accuracy): the CLI prints the report and exits 1.
"""

from __future__ import annotations

from fedge.errors import OneReasonError


class ExportError(OneReasonError):
    """A user mistake, reported as one line: what is wrong and how to fix it."""

    default_reason = "export"


class QualityError(Exception):
    """The output exists or could be built, but fails a quality bar.

    ``report`` is the readable multi-line explanation (parity table, accuracy
    drop); ``str(err)`` is the one-line summary.
    """

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report
