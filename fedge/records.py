"""The round record: what one closed round did, as the aggregator logs it
(``rounds.jsonl``), publishes it (the events topic), and ``fedge watch`` and
the demo show it.

One typed value from the round core to every reader: the core fills what
the round did, the aggregator's shell adds the evaluation and its own
counts, and a program embedding the service receives it through its
``on_record`` hook. ``from_json`` is the boundary for records read back from
a file or from the network (``fedge watch``): every field is checked into
its type, or the record is refused with a ``RecordError``.

Read access by key (``record["accuracy"]``, ``record.get("loss")``) is kept
for programs that treated records as the JSON objects they are on disk.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fedge.errors import OneReasonError


class RecordError(OneReasonError):
    """A round record that does not have the shape of one."""

    default_reason = "bad_record"


@dataclass(frozen=True)
class RoundRecord:
    round: int
    attempt: int
    status: str  # ok | failed
    closed_by: str  # quorum | deadline
    selected: int
    clients: int  # updates folded
    declined: int
    late: int
    rejected: dict[str, int]  # reason -> count
    num_samples: int
    train_loss: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    model_digest: str
    accepted: tuple[str, ...] = ()
    # What the defences did (aggregator.robust):
    failure: str | None = None  # why the round failed: too_few_updates, model_unavailable, nonfinite_model, ...
    norm_bound: float | None = None  # the L2 bound applied to updates, if any
    clipped: int = 0  # updates scaled down to the bound
    weight_capped: int = 0  # updates whose weight was capped
    left_out: tuple[str, ...] = ()  # accepted updates the rule left out (krum)
    # Added by the aggregator's shell:
    accuracy: float | None = None
    loss: float | None = None
    eval_seconds: float | None = None
    dropped_chunks: int = 0
    time: float | None = None
    recovered: bool = False  # written back from a checkpoint after a crash
    # The aggregator's CPU seconds since the previous record, by stage
    # (aggregator.cpu): its main thread's stages, "mqtt", "other_threads".
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer build added

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["accepted"] = list(self.accepted)
        out["left_out"] = list(self.left_out)
        out["rejected"] = dict(self.rejected)
        for key in ("train_loss", "accuracy", "loss", "norm_bound"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None  # JSON has no Inf or NaN (a diverged model's loss)
        for key in ("accuracy", "loss", "eval_seconds", "time", "failure", "norm_bound"):
            if out[key] is None:
                del out[key]
        if not self.recovered:
            del out["recovered"]
        if self.cpu_seconds:
            out["cpu_seconds"] = dict(self.cpu_seconds)
        else:
            del out["cpu_seconds"]
        for key in ("clipped", "weight_capped", "left_out"):
            if not out[key]:
                del out[key]
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, data: Any) -> RoundRecord:
        if not isinstance(data, dict):
            raise RecordError(f"a round record must be a JSON object, not {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name in known:
            if name == "extra" or name not in data:
                continue
            kwargs[name] = _typed(name, data[name])
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecordError(f"round record lacks {', '.join(missing)}")
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RoundRecord:
        return dataclasses.replace(self, **changes)

    # Read access by key, for programs that treat records as JSON objects.
    def __getitem__(self, key: str) -> Any:
        data = self.to_json()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()


_INTS = {"round", "attempt", "selected", "clients", "declined", "late", "num_samples", "bytes_up", "bytes_down",
         "dropped_chunks", "clipped", "weight_capped"}
_FLOATS = {"seconds"}
_OPTIONAL_FLOATS = {"train_loss", "accuracy", "loss", "eval_seconds", "time", "norm_bound"}
_STRINGS = {"status", "closed_by", "model_digest"}


def _typed(name: str, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _INTS and isinstance(value, int) and not isinstance(value, bool):
        return value
    if name in _FLOATS and number:
        return float(value)
    if name in _OPTIONAL_FLOATS and (value is None or number):
        return None if value is None else float(value)
    if name in _STRINGS and isinstance(value, str):
        return value
    if name == "failure" and (value is None or isinstance(value, str)):
        return value
    if name == "recovered" and isinstance(value, bool):
        return value
    if name in ("accepted", "left_out") and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if name == "cpu_seconds" and isinstance(value, dict) and len(value) <= 64 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v >= 0 for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    if name == "rejected" and isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
        return dict(value)
    raise RecordError(f"round record field {name!r} has the wrong type ({type(value).__name__})")
