"""FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data". The new model is the sample-weighted
average of the clients' models, i.e. global + lr * mean delta with lr = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregator.optimizers.base import ServerOptimizer
from fedge.tensors import ModelArrays


@dataclass
class FedAvg(ServerOptimizer):
    lr: float = 1.0
    name = "fedavg"

    def step(self, global_model: ModelArrays, avg_delta: ModelArrays) -> ModelArrays:
        return {k: (w + np.float32(self.lr) * avg_delta[k]).astype(np.float32) for k, w in global_model.items()}

