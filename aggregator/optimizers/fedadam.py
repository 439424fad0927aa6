"""FedAdam: Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR),
Algorithm 2 with the Adam second-moment update and no bias correction, as
published:

    m <- beta1 * m + (1 - beta1) * delta
    v <- beta2 * v + (1 - beta2) * delta^2
    w <- w + lr * m / (sqrt(v) + tau)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aggregator.optimizers.base import ServerOptimizer
from fedge.tensors import ModelArrays


@dataclass
class FedAdam(ServerOptimizer):
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: ModelArrays = field(default_factory=dict)
    v: ModelArrays = field(default_factory=dict)
    name = "fedadam"
    params = ("lr", "beta1", "beta2", "tau")

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * d2

    def step(self, global_model: ModelArrays, avg_delta: ModelArrays) -> ModelArrays:
        if not self.m:
            self.m = {k: np.zeros_like(w, dtype=np.float32) for k, w in global_model.items()}
            self.v = {k: np.full_like(w, self.tau**2, dtype=np.float32) for k, w in global_model.items()}
        out = {}
        for k, w in global_model.items():
            d = avg_delta[k].astype(np.float32)
            self.m[k] = (self.beta1 * self.m[k] + (1.0 - self.beta1) * d).astype(np.float32)
            self.v[k] = self._second_moment(self.v[k], d * d).astype(np.float32)
            out[k] = (w + self.lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict[str, ModelArrays]:
        return {"m": self.m, "v": self.v} if self.m else {}

    def load_state(self, slots: dict[str, ModelArrays]) -> None:
        self.m = dict(slots.get("m", {}))
        self.v = dict(slots.get("v", {}))

