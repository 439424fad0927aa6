"""Calibration and evaluation data: named input arrays and optional labels.

Owns reading a set from either
- a ``.npz`` file whose arrays are named after the model's inputs (or hold a
  single array for a one-input model), with labels under ``labels``,
  ``label`` or ``y``; or a ``.npy`` file holding the one input of a one-input
  model (no labels); both loaded with ``allow_pickle=False``; or
- a data spec ``module:callable`` plus keyword arguments returning ``(x, y)``
  arrays (``fedge.datasets:digits``); ``split`` is passed when the callable
  takes it (``train`` for calibration, ``test`` for evaluation) unless the
  arguments already name one.

NumPy only: a data spec that returns tensors is converted with
``np.asarray``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.files import sha256_file
from fedge.errors import first_line

LABEL_KEYS = ("labels", "label", "y")


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> Dataset:
        if n <= 0 or n >= self.rows:
            return self
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, {**self.source, "rows": n})


def is_data_spec(text: str) -> bool:
    return ":" in text and not text.endswith((".npz", ".npy")) and not Path(text).exists()


def load_dataset(spec: str, input_names: Sequence[str], *, args: Mapping[str, Any] | None = None,
                 split: str | None = None, limit: int = 0, what: str = "calibration") -> Dataset:
    """Read ``spec`` (an ``.npz`` path or a ``module:callable``) for a model
    with inputs ``input_names``; keep the first ``limit`` rows if given."""
    if is_data_spec(spec):
        ds = _from_callable(spec, input_names, args or {}, split, what)
    else:
        ds = _from_npz(Path(spec), input_names, what)
    return ds.head(limit) if limit else ds


def _from_npz(path: Path, input_names: Sequence[str], what: str) -> Dataset:
    if not path.is_file():
        raise ExportError(f"{what} file {str(path)!r} not found; give an .npz with arrays named after the model "
                          f"inputs ({', '.join(input_names)}), or a data spec such as fedge.datasets:digits")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy file: one array, no labels
            arrays = {"": loaded}
        else:
            with loaded as z:
                arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ExportError(f"{what} file {str(path)!r} is not a readable .npz or .npy file ({first_line(exc, 120)}); "
                          "save it with np.savez(path, x=inputs, labels=labels)") from None
    source = {"kind": "npy" if "" in arrays else "npz", "file": path.name, "sha256": sha256_file(path)}
    if "" in arrays:
        if len(input_names) != 1:
            raise ExportError(f"{what} file {path.name} is a .npy holding one array, but the model has inputs "
                              f"{list(input_names)}: save an .npz with one array named after each")
        return _checked({input_names[0]: arrays[""]}, None, source, what)
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    if all(n in arrays for n in input_names):
        inputs = {n: arrays[n] for n in input_names}
    elif len(input_names) == 1 and len(arrays) == 1:
        inputs = {input_names[0]: next(iter(arrays.values()))}
    elif not arrays:
        raise ExportError(f"{what} file {path.name} holds labels but no input arrays; add the inputs named after "
                          f"the model's ({', '.join(input_names)}), e.g. np.savez(path, {input_names[0]}=x, labels=y)")
    else:
        raise ExportError(f"{what} file {path.name} has arrays {sorted(arrays)}; name them after the model inputs "
                          f"({', '.join(input_names)}), or store one array for a one-input model (labels as 'labels')")
    return _checked(inputs, labels, source, what)


def _from_callable(spec: str, input_names: Sequence[str], args: Mapping[str, Any], split: str | None,
                   what: str) -> Dataset:
    from fedge.imports import ImportSpecError, load_callable

    try:
        fn = load_callable(spec, f"{what} data")
    except ImportSpecError as exc:
        raise ExportError(str(exc)) from None
    kwargs = dict(args)
    if split and "split" not in kwargs and _accepts(fn, "split"):
        kwargs["split"] = split
    try:
        out = fn(**kwargs)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        raise ExportError(f"{what} data {spec!r} failed with arguments {kwargs}: {exc}") from None
    labels = None
    if isinstance(out, Mapping):
        arrays = {k: np.asarray(v) for k, v in out.items()}
        labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
        inputs = {n: arrays[n] for n in input_names if n in arrays}
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        if len(input_names) != 1:
            raise ExportError(f"{what} data {spec!r} returned (x, y) but the model has inputs {list(input_names)}; "
                              "return a dict of arrays named after them")
        inputs, labels = {input_names[0]: np.asarray(out[0])}, np.asarray(out[1])
    else:
        inputs = {input_names[0]: np.asarray(out)} if len(input_names) == 1 else {}
    if set(inputs) != set(input_names):
        raise ExportError(f"{what} data {spec!r} did not give arrays for the model inputs {list(input_names)}; "
                          "return (x, y) or a dict of arrays")
    return _checked(inputs, labels, {"kind": "data_spec", "spec": spec, "args": kwargs}, what)


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _checked(inputs: dict[str, np.ndarray], labels: np.ndarray | None, source: dict[str, Any], what: str) -> Dataset:
    sizes = {k: len(v) for k, v in inputs.items() if v.ndim > 0}
    if len(sizes) != len(inputs) or not sizes or min(sizes.values()) == 0:
        raise ExportError(f"{what} data has no rows (or scalar arrays): {sizes}")
    if len(set(sizes.values())) != 1:
        raise ExportError(f"{what} inputs have different row counts {sizes}")
    n = next(iter(sizes.values()))
    if labels is not None:
        labels = _class_labels(labels, n, what)
    return Dataset(inputs, labels, {**source, "rows": n})


def _class_labels(labels: np.ndarray, rows: int, what: str) -> np.ndarray:
    """One integer class per row, or a one-line error."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.ndim != 1:
        raise ExportError(f"{what} labels have shape {labels.shape}; give one class index per row, shape ({rows},) "
                          "(one-hot labels: labels.argmax(1))")
    if len(labels) != rows:
        raise ExportError(f"{what} data has {rows} rows but {len(labels)} labels")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise ExportError(f"{what} labels hold fractional values; give integer class indices")
    if labels.dtype.kind not in "biuf":
        raise ExportError(f"{what} labels hold {labels.dtype} values; give integer class indices")
    return labels.astype(np.int64)


def check_fits(data: Dataset, inputs: Sequence[tuple[str, Any, tuple[Any, ...]]], what: str) -> None:
    """Refuse data the model would misread: each array must have the model's
    rank, fixed dimensions and kind of values (see ``fedge.onnxrt.check_input``);
    ``inputs`` is ``OnnxPredictor.inputs``: (name, dtype, shape) per input."""
    from fedge.onnxrt import OnnxModelError, check_input

    for name, dtype, shape in inputs:
        try:
            check_input(name, data.inputs[name], np.dtype(dtype), shape)
        except OnnxModelError as exc:
            raise ExportError(f"{what} data does not fit the model: {exc}") from None
