"""The updates of one round: admission, and the running sum they fold into.

An update that passes the round's checks is *admitted*: its body is decoded
once into a scratch model to prove it is a finite delta of the model's shape
and to measure its L2 norm. What happens next is the aggregation rule's
business (``aggregator.robust.RoundAggregate``):

* ``mean`` (the default) folds it into a ``RunningSum`` at once, straight
  from the scratch model, once the round's norm bound and sample cap are
  fixed; only the first few updates of a round (``robust.CALIBRATION``) are
  kept as received until then. Memory: two models (scratch and sum, 8P
  bytes for P parameters) and a few bodies, whatever the fleet size.
* ``median``, ``trimmed_mean``, ``krum`` keep every body as received
  (compressed: an int2 update is about 1/16 of the float32 delta) and hold
  the round dense at close, 4nP bytes for n updates (plus an n x n distance
  matrix for krum). The job refuses to start when ``selection.max_clients``
  x 4P exceeds ``limits.aggregation_bytes`` (see ``robust.dense_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.codecs import CodecError, UpdateCodec
from fedge.tensors import ModelArrays, TensorSpec, l2_norm, zeros_like_spec


@dataclass(frozen=True)
class Admitted:
    """One accepted update of the open round, as received."""

    client: str
    body: bytes | None  # as received, while the rule needs it; None once folded
    samples: int
    norm: float  # L2 norm of the decoded delta
    scale: float = 1.0  # a buffered job's staleness weight: scales the update in the sum, not the denominator


class RoundUpdates:
    """The admitted updates of the open round (cleared when it closes)."""

    def __init__(self, spec: TensorSpec, codec: UpdateCodec) -> None:
        self.spec = spec
        self.codec = codec
        self.items: list[Admitted] = []
        self.scratch = zeros_like_spec(spec)

    def __len__(self) -> int:
        return len(self.items)

    def measure(self, body: bytes) -> float:
        """Decode ``body`` into the scratch model (``self.scratch``, valid
        until the next decode) and return its L2 norm. Raises ``CodecError``/
        ``TensorError`` for a body that is not a finite delta of the model's
        shape."""
        delta = self.decode(body)
        # One pass a tensor: a float32 sum of squares is finite only if every
        # entry is, and is then the part ``l2_norm`` adds up.
        total = 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            for a in delta.values():
                part = float(np.dot(a.reshape(-1), a.reshape(-1)))
                if not math.isfinite(part):
                    break
                total += part
            else:
                return math.sqrt(total)
        for name, a in delta.items():
            if not np.isfinite(a).all():
                raise CodecError("nonfinite", f"update tensor {name!r} decodes to NaN or Inf")
        norm = l2_norm(delta)
        if not math.isfinite(norm):
            raise CodecError("nonfinite", "update's norm overflows float64")
        return norm

    def admit(self, client: str, body: bytes, samples: int) -> Admitted:
        """``measure`` the body and keep it; raises (and keeps nothing) for a
        body that is not a finite delta of the model's shape."""
        norm = self.measure(body)
        item = Admitted(client, bytes(body), int(samples), norm)
        self.items.append(item)
        return item

    def decode(self, body: bytes) -> ModelArrays:
        """The dense delta of ``body`` in the scratch model (valid until the
        next call; unspecified after a body that raises)."""
        self.codec.decode_into(body, self.spec, self.scratch)
        return self.scratch

    def reset(self) -> None:
        self.items.clear()


class RunningSum:
    """A weighted sum of deltas folded straight from their codec bodies:
    float32 accumulators, one model's worth of memory."""

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.acc: dict[str, np.ndarray] = {name: np.zeros(shape, dtype=np.float32) for name, shape in spec.entries}
        self.total_weight = 0.0
        self.count = 0

    def fold(self, codec: UpdateCodec, body: bytes, weight: float) -> None:
        """Add ``weight * delta``; raises (and leaves the sum untouched) when
        the body does not decode to a valid delta for ``spec``."""
        if not weight > 0:
            raise ValueError("weight must be positive")
        codec.fold(body, self.spec, self.acc, weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> ModelArrays:
        if self.count == 0:
            raise ValueError("no updates folded")
        return {name: (a / np.float32(self.total_weight)).astype(np.float32) for name, a in self.acc.items()}

    def reset(self) -> None:
        for a in self.acc.values():
            a.fill(0.0)
        self.total_weight = 0.0
        self.count = 0
