"""What a server optimizer is: a function of (global model, averaged delta)
with some state of its own that survives checkpoints.

The averaged delta is the sample-weighted mean of the clients' deltas
(local - global); a server optimizer treats it as a pseudo-gradient with the
sign flipped (Reddi et al. 2021).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from fedge.tensors import ModelArrays


class ServerOptimizer(ABC):
    name: ClassVar[str]
    # The config keys ([server] section) this optimizer is built from.
    params: ClassVar[tuple[str, ...]] = ("lr",)

    @abstractmethod
    def step(self, global_model: ModelArrays, avg_delta: ModelArrays) -> ModelArrays:
        """The next global model (float32). Must not modify its inputs."""

    def state(self) -> dict[str, ModelArrays]:
        """Named slots of arrays to checkpoint (e.g. {'m': ..., 'v': ...})."""
        return {}

    def load_state(self, slots: dict[str, ModelArrays]) -> None:  # noqa: B027 - stateless by default
        """Restore what ``state`` returned."""

