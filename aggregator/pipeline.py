"""What a round's updates add up to, and what the round releases.

A round's updates pass through stages, each in a module of its own:

* **admission** (``aggregator.admission``): whether a message is an update
  the round may count at all (its job, sender, round, base model, codec,
  sample count), in an ordered table of named checks;
* **folding** (``aggregator.robust``, over ``aggregator.fold``): each
  admitted update is decoded, bounded (norm bound, weight cap), filtered by
  direction and added to the round's running sum; or kept whole for a dense
  rule (median, trimmed mean, Krum). The defences' memory of recent rounds
  (median norms and sample counts, the direction reference) is
  ``aggregator.defences.DefenceHistory``;
* **secure aggregation** (``aggregator.secure``): the devices mask their
  updates and the aggregator only ever sees their sum;
* **privacy** (``aggregator.privacy``): a private round's sum gets Gaussian
  noise and a fixed denominator; the accountant counts the round.

Every path ends in a ``Partial``: the exact weighted sum of the updates the
round counted, the weight it is to be divided by, and what the defences did.
A partial is what a relay forwards to its parent and what a buffer holds:
two partials of the same model add up (``Partial.plus``). ``release`` turns
one into the round's ``Combined`` result, the mean delta the server
optimizer steps with (a private round's release is
``aggregator.privacy.release_private``: noise, then the fixed denominator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from fedge.tensors import ModelArrays


@dataclass(frozen=True, kw_only=True)
class Partial:
    """The weighted sum of a round's counted updates, before anything is
    divided or noised.

    ``sum`` holds each update times its weight (capped samples; one in a
    private or secure round) and its bound factor; ``weight`` is the sum of
    the weights, the mean's denominator. A dense rule's result is no sum:
    ``averaged`` is then true and ``sum`` is already the mean (weight 1), so
    it cannot be added to another partial."""

    sum: ModelArrays
    weight: float
    used: tuple[str, ...]  # clients whose update is in the sum (a filter or Krum leaves some out)
    bound: float | None = None  # the norm bound applied, if any
    clipped: int = 0  # updates scaled down to the bound
    capped: int = 0  # updates whose weight was capped
    median_norm: float = math.nan  # of the updates, before clipping (NaN: not seen, as in secure aggregation)
    median_samples: float = 0.0  # claimed by the updates, before capping
    bits: float = 0.0  # adaptive clipping: the updates' reports of being within the clip, summed
    averaged: bool = False

    def plus(self, other: Partial) -> Partial:
        """Both partials' updates in one sum (a relay's regions, a buffer's
        arrivals). The medians are the larger of the two's: a bound, not a
        median of the union, which neither side kept."""
        if self.averaged or other.averaged:
            raise ValueError("a dense rule's result is a mean, not a sum: it cannot be added to")
        if set(self.sum) != set(other.sum):
            raise ValueError("partials of different models cannot be added")
        both = {k: (self.sum[k] + other.sum[k]).astype(np.float32) for k in self.sum}
        bounds = [b for b in (self.bound, other.bound) if b is not None]
        return replace(
            self, sum=both, weight=self.weight + other.weight, used=self.used + other.used,
            bound=max(bounds) if bounds else None, clipped=self.clipped + other.clipped,
            capped=self.capped + other.capped, median_norm=_larger(self.median_norm, other.median_norm),
            median_samples=max(self.median_samples, other.median_samples), bits=self.bits + other.bits)


def _larger(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


@dataclass(frozen=True)
class PrivateRelease:
    """What a private round added to its sum, for the round's record."""

    shares: int  # noise shares in the sum (distributed), else 0
    noise_std: float  # the noise the aggregator itself added, per coordinate
    unclipped: float | None  # adaptive clipping: the noised fraction of updates within the clip


@dataclass(frozen=True)
class Combined:
    """A round's result: the mean ``delta`` the server optimizer steps with,
    the ``partial`` it was released from and, for a private round, what its
    release added."""

    delta: ModelArrays
    partial: Partial
    private: PrivateRelease | None = field(default=None)

    # What the defences did, as the round's record reports it.
    @property
    def used(self) -> tuple[str, ...]:
        return self.partial.used

    @property
    def bound(self) -> float | None:
        return self.partial.bound

    @property
    def clipped(self) -> int:
        return self.partial.clipped

    @property
    def capped(self) -> int:
        return self.partial.capped

    @property
    def median_norm(self) -> float:
        return self.partial.median_norm

    @property
    def median_samples(self) -> float:
        return self.partial.median_samples


class Stage(Protocol):
    """What every stage that keeps state across rounds offers the round core,
    beside its own work: the fields a round's announcement carries from it,
    what a closed round's record says of it, and its state for the
    checkpoint (arrays, and plain data under keys of its own)."""

    def announced(self) -> dict[str, Any]: ...

    def recorded(self, combined: Combined | None) -> dict[str, Any]: ...

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None: ...


def release(partial: Partial) -> Combined:
    """The weighted mean of a (non-private) partial."""
    if partial.averaged:
        return Combined(partial.sum, partial)
    if not partial.weight > 0:
        raise ValueError("no updates admitted")
    scale = np.float32(1.0 / partial.weight)
    delta = {}
    for name, a in partial.sum.items():
        if a.dtype == np.float32:
            delta[name] = a * scale
        else:  # an exact sum (float64, as secure aggregation unmasks it)
            delta[name] = (a / partial.weight).astype(np.float32)
    return Combined(delta, partial)
