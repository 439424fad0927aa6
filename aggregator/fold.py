"""The streaming weighted sum of one round.

Each valid update is folded into the sum the moment it arrives, straight
from its codec payload; nothing per client is kept. Memory is one model's
worth whatever the fleet size: float32 accumulators, whose rounding (about
1e-6 relative over a thousand updates) is far below any lossy codec's step
(1/127 of a tensor's range for int8) and twice as fast to fold as float64.
"""

from __future__ import annotations

import numpy as np

from fedge.codecs import UpdateCodec
from fedge.tensors import ModelArrays, TensorSpec


class RunningSum:
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
