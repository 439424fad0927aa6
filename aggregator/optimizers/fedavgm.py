"""FedAvgM: server momentum. Hsu, Qi and Brown 2019, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification".

    m <- momentum * m + delta
    w <- w + lr * m
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aggregator.optimizers.base import ServerOptimizer
from fedge.tensors import ModelArrays


@dataclass
class FedAvgM(ServerOptimizer):
    lr: float = 1.0
    momentum: float = 0.9
    m: ModelArrays = field(default_factory=dict)
    name = "fedavgm"
    params = ("lr", "momentum")

    def step(self, global_model: ModelArrays, avg_delta: ModelArrays) -> ModelArrays:
        if not self.m:
            self.m = {k: np.zeros_like(v, dtype=np.float32) for k, v in global_model.items()}
        out = {}
        for k, w in global_model.items():
            self.m[k] = (np.float32(self.momentum) * self.m[k] + avg_delta[k]).astype(np.float32)
            out[k] = (w + np.float32(self.lr) * self.m[k]).astype(np.float32)
        return out

    def state(self) -> dict[str, ModelArrays]:
        return {"m": self.m} if self.m else {}

    def load_state(self, slots: dict[str, ModelArrays]) -> None:
        self.m = dict(slots.get("m", {}))

