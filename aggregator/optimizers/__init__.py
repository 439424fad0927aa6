"""Server optimizers: what turns a round's averaged delta into the next
global model. One per file, each opening with the paper it implements:

- ``fedavg``: McMahan et al. 2017 (plain weighted average, server lr);
- ``fedavgm``: Hsu, Qi and Brown 2019 (server momentum);
- ``fedadam`` and ``fedyogi``: Reddi et al. 2021 (adaptive).

``OPTIMIZERS`` is the registry a job's ``[server] optimizer`` names; each
optimizer declares the ``[server]`` keys it is built from (``params``).
Adding an algorithm is adding a file and a line in the registry. Who takes
part in a round is ``aggregator.selection``'s business, not this folder's.
"""

from __future__ import annotations

from aggregator.config import ServerSection
from aggregator.optimizers.base import ServerOptimizer
from aggregator.optimizers.fedadam import FedAdam
from aggregator.optimizers.fedavg import FedAvg
from aggregator.optimizers.fedavgm import FedAvgM
from aggregator.optimizers.fedyogi import FedYogi

__all__ = ["OPTIMIZERS", "SERVER_OPTIMIZERS", "ServerOptimizer", "make_server_optimizer"]

OPTIMIZERS: dict[str, type[ServerOptimizer]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi)}
SERVER_OPTIMIZERS = tuple(OPTIMIZERS)


def make_server_optimizer(cfg: ServerSection) -> ServerOptimizer:
    """The optimizer ``cfg.optimizer`` names, built from the ``[server]`` keys it declares."""
    cls = OPTIMIZERS.get(cfg.optimizer)
    if cls is None:
        raise ValueError(f"unknown server optimizer {cfg.optimizer!r}; use one of {', '.join(SERVER_OPTIMIZERS)}")
    return cls(**{key: getattr(cfg, key) for key in cls.params})
