"""FedYogi: Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR).
FedAdam with Yogi's additive second-moment update, which grows v slowly
when gradients are large and so adapts more gently:

    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregator.optimizers.fedadam import FedAdam


@dataclass
class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
