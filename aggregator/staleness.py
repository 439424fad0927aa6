"""Buffered asynchronous aggregation's numbers: how many devices train at
once, how many updates make a version, how stale an update may be and how
much a stale one weighs.

An update trained from version v and folded while version V is being built
has staleness s = V - v (0: trained from the newest model). FedBuff
(Nguyen et al. 2022) weighs it by ``1 / (1 + s)^a`` (polynomial, a = 0.5 in
the paper); FedAsync (Xie et al. 2019) also gives a constant weight and a
hinge, which weighs fully up to ``b`` versions and then falls as
``1 / (1 + slope x (s - b))``. The weight scales the update's contribution
to the buffer's sum, never the sum's denominator: a buffer of stale updates
moves the model less, as in the paper, rather than being renormalized back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

STALENESS = ("polynomial", "constant", "hinge")


@dataclass(frozen=True)
class BufferedPolicy:
    concurrency: int
    buffer_size: int
    max_staleness: int
    staleness: str = "polynomial"
    exponent: float = 0.5
    hinge_after: int = 4
    hinge_slope: float = 1.0

    @classmethod
    def from_config(cls, cfg: AggregatorConfig) -> BufferedPolicy | None:
        """The job's policy, or None when it runs synchronous rounds."""
        if cfg.server.mode != "buffered":
            return None
        b = cfg.buffered
        return cls(concurrency=b.concurrency, buffer_size=b.buffer_size, max_staleness=b.max_staleness,
                   staleness=b.staleness, exponent=b.staleness_exponent, hinge_after=b.hinge_after,
                   hinge_slope=b.hinge_slope)

    def weight(self, staleness: int) -> float:
        """What an update ``staleness`` versions old weighs, in (0, 1]."""
        s = max(0, staleness)
        if self.staleness == "constant":
            return 1.0
        if self.staleness == "hinge":
            return 1.0 if s <= self.hinge_after else 1.0 / (1.0 + self.hinge_slope * (s - self.hinge_after))
        return float((1.0 + s) ** -self.exponent)
