"""Server optimizers, one per file; ``make_server_optimizer`` builds the one a
job names. Adding an algorithm is adding a file and a line here."""

from __future__ import annotations

from aggregator.config import ServerSection
from aggregator.strategies.base import ServerOptimizer
from aggregator.strategies.fedadam import FedAdam
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedavgm import FedAvgM
from aggregator.strategies.fedyogi import FedYogi

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer", "make_server_optimizer"]

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


def make_server_optimizer(cfg: ServerSection) -> ServerOptimizer:
    if cfg.optimizer == "fedavg":
        return FedAvg(lr=cfg.lr)
    if cfg.optimizer == "fedavgm":
        return FedAvgM(lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "fedadam":
        return FedAdam(lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)
    if cfg.optimizer == "fedyogi":
        return FedYogi(lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)
    raise ValueError(f"unknown server optimizer {cfg.optimizer!r}; use one of {', '.join(SERVER_OPTIMIZERS)}")
