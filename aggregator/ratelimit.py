"""Per-device rate limits on what the aggregator receives.

A token bucket per device and channel: ``rate`` messages per second on
average, ``burst`` at once. What a bucket refuses is dropped before any work
is spent on it (counted as ``rate_limited``). The buckets are bounded in
number: past ``max_keys``, the longest-idle one is forgotten (and starts
full again if its device comes back), so invented ids cannot grow memory.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable

from fedge.logs import fields

log = logging.getLogger("fedge.aggregator")


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False (and nothing
        taken) when it holds fewer."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


class DeviceLimits:
    """The aggregator's limits on what each device sends (``[limits]``):
    presences and whole messages per second, and chunk bytes (two updates
    at once, one per ten seconds on average); and its logging, one line a
    minute per (device, kind), so that a flood cannot flood the log too."""

    def __init__(self, messages_per_s: float, burst: float, max_update_bytes: int, max_devices: int) -> None:
        self.presence = RateLimiter(messages_per_s, burst, max_devices)
        self.messages = RateLimiter(messages_per_s, burst, max_devices)
        self.chunk_bytes = RateLimiter(max_update_bytes / 10, 2 * max_update_bytes + (1 << 20), max_devices)
        self.log = RateLimiter(1 / 60, 1, 10_000)

    def over(self, limiter: RateLimiter, client: str, what: str, now: float, cost: float = 1.0) -> bool:
        """True (the caller counts it as ``rate_limited``; logged at most once
        a minute per device) when ``client`` is over its rate for ``what``."""
        if limiter.allow(client, now, cost):
            return False
        if self.log.allow((client, what), now):
            log.warning("%s is over its rate of %s; dropping (counted as rate_limited, logged once a minute)",
                        client, what, extra=fields(device=client, reason="rate_limited"))
        return True
