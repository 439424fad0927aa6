"""What a round's admitted updates become: defences, then an aggregation rule.

A device's update is a claim: its delta and its sample count are whatever
the device says. Three defences bound what one device can do to the model,
on by default, before any rule runs:

* **finite**: an update that decodes to NaN or Inf is refused on arrival
  (``fold.RoundUpdates.admit``), and a round whose new model is not finite
  fails and keeps the model (``aggregator.rounds``).
* **norm bound**: every delta longer than a bound is scaled down to it
  (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"). The bound
  adapts to the fleet: ``clip_multiplier`` x the median of the norms of the
  round's updates and of the median norms of the last ``HISTORY`` rounds
  (so that in a small round a few hostile updates cannot set their own
  bound); the first round of a job, with fewer than three updates, is not
  bounded. ``clip = "fixed"`` uses ``clip_norm`` instead.
* **weight cap**: no update carries more than ``weight_cap / n`` of a
  round's weight (n updates), whatever sample count it claims. Water-filling
  finds the cap c with ``min(w_i, c) = c`` for the heaviest and
  ``c = weight_cap / n * sum(min(w_j, c))``.

Then the rule (``[server] aggregation``):

* ``mean``: the weighted mean (FedAvg, McMahan et al. 2017), streamed body
  by body: memory one model.
* ``median``: coordinate-wise median (Yin et al. 2018), unweighted.
* ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` largest and
  smallest values and average the rest (Yin et al. 2018), unweighted.
* ``krum``: multi-Krum (Blanchard et al. 2017): score each update by its
  squared distances to its n - f - 2 nearest others, average the ``krum_m``
  best-scored (default n - f) with their capped weights.

The three robust rules hold every update dense: 4 bytes x parameters x
updates (``dense_bytes``), which a job bounds with ``selection.max_clients``
and ``limits.aggregation_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aggregator.fold import RoundUpdates, RunningSum
from fedge.tensors import ModelArrays, TensorSpec

if TYPE_CHECKING:
    from aggregator.config import ServerSection

RULES = ("mean", "median", "trimmed_mean", "krum")
CLIPS = ("adaptive", "fixed", "off")
DENSE_RULES = ("median", "trimmed_mean", "krum")
# Rounds whose median norm the adaptive bound remembers, for small rounds.
HISTORY = 10


@dataclass(frozen=True)
class Defences:
    """How a round's updates are bounded and combined (``[server]`` keys)."""

    rule: str = "mean"
    clip: str = "adaptive"
    clip_norm: float = 0.0
    clip_multiplier: float = 1.0
    weight_cap: float = 2.0
    trim_fraction: float = 0.1
    krum_f: int = 1
    krum_m: int = 0

    @classmethod
    def from_config(cls, server: ServerSection) -> Defences:
        return cls(rule=server.aggregation, clip=server.clip, clip_norm=server.clip_norm,
                   clip_multiplier=server.clip_multiplier, weight_cap=server.weight_cap,
                   trim_fraction=server.trim_fraction, krum_f=server.krum_f, krum_m=server.krum_m)


@dataclass(frozen=True)
class Combined:
    """One round's averaged delta and what the defences did to get it."""

    delta: ModelArrays
    used: tuple[str, ...]  # clients whose update is in the delta (krum leaves some out)
    bound: float | None  # the norm bound applied, if any
    clipped: int  # updates scaled down to the bound
    capped: int  # updates whose weight was capped
    median_norm: float  # of the round's updates, before clipping


def dense_bytes(spec: TensorSpec, updates: int) -> int:
    """Memory a robust rule needs for ``updates`` dense float32 deltas."""
    params = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in spec.entries)
    return 4 * params * updates + 8 * updates * updates


def capped_shares(samples: Sequence[float], cap: float) -> tuple[np.ndarray, int]:
    """Each update's share of the round (summing to 1): proportional to its
    samples, but none above ``cap / n``; ``cap`` 0 means no cap. Returns the
    shares and how many were capped."""
    w = np.asarray(samples, dtype=np.float64)
    n = len(w)
    if n == 0:
        raise ValueError("no updates")
    if cap <= 0 or cap >= n:
        return w / w.sum(), 0
    s = cap / n
    ordered = np.sort(w)[::-1]
    for k in range(n):  # the k heaviest are capped at c
        if s * k >= 1:
            break
        c = s * ordered[k:].sum() / (1 - s * k)
        if ordered[k] <= c * (1 + 1e-12) and (k == 0 or ordered[k - 1] >= c):
            out = np.minimum(w, c)
            return out / out.sum(), int(k)
    return np.full(n, 1.0 / n), int(np.count_nonzero(w > w.min()))


def norm_bound(norms: Sequence[float], history: Sequence[float], d: Defences) -> float | None:
    """The L2 bound for this round's updates, or None for no bound."""
    if d.clip == "off":
        return None
    if d.clip == "fixed":
        return d.clip_norm
    pool = [*norms, *history]
    if len(pool) < 3 and not history:
        return None
    return d.clip_multiplier * float(np.median(pool))


def combine(updates: RoundUpdates, d: Defences, history: Sequence[float]) -> Combined:
    """The round's averaged delta under ``d``; ``history`` holds the median
    norms of recent rounds (for the adaptive bound of a small round)."""
    items = updates.items
    if not items:
        raise ValueError("no updates admitted")
    norms = np.array([a.norm for a in items])
    bound = norm_bound([a.norm for a in items], history, d)
    factors = np.ones(len(items)) if bound is None else np.minimum(1.0, bound / np.maximum(norms, 1e-30))
    clipped = int(np.count_nonzero(factors < 1.0))
    shares, capped = capped_shares([a.samples for a in items], d.weight_cap)
    used = tuple(a.client for a in items)
    if d.rule == "mean":
        delta = _weighted(updates, shares * factors)
    else:
        stacks = _dense(updates, factors)
        if d.rule == "median":
            delta = {k: np.median(v, axis=0).astype(np.float32) for k, v in stacks.items()}
        elif d.rule == "trimmed_mean":
            delta = {k: _trimmed(v, d.trim_fraction) for k, v in stacks.items()}
        elif d.rule == "krum":
            keep = _krum(stacks, d.krum_f, d.krum_m)
            kept_shares, _ = capped_shares([items[i].samples for i in keep], d.weight_cap)
            delta = {k: np.tensordot(kept_shares.astype(np.float32), v[keep], axes=1).astype(np.float32)
                     for k, v in stacks.items()}
            used = tuple(items[i].client for i in keep)
        else:
            raise ValueError(f"unknown aggregation rule {d.rule!r}")
    return Combined(delta, used, bound, clipped, capped, float(np.median(norms)))


def _weighted(updates: RoundUpdates, coefs: np.ndarray) -> ModelArrays:
    """sum_i coefs[i] * delta_i, folded body by body (one model of memory)."""
    total = RunningSum(updates.spec)
    for item, coef in zip(updates.items, coefs, strict=True):
        if coef > 0:
            total.fold(updates.codec, item.body, float(coef))
    return total.acc


def _dense(updates: RoundUpdates, factors: np.ndarray) -> dict[str, np.ndarray]:
    """Every update dense and scaled by its clip factor: name -> (n, *shape)."""
    n = len(updates.items)
    stacks = {name: np.empty((n, *shape), dtype=np.float32) for name, shape in updates.spec.entries}
    for i, item in enumerate(updates.items):
        for name, a in updates.decode(item.body).items():
            np.multiply(a, np.float32(factors[i]), out=stacks[name][i])
    return stacks


def _trimmed(values: np.ndarray, fraction: float) -> np.ndarray:
    n = values.shape[0]
    k = min(math.floor(fraction * n), (n - 1) // 2)
    if k == 0:
        return values.mean(axis=0).astype(np.float32)
    ordered = np.sort(values, axis=0)
    return ordered[k:n - k].mean(axis=0).astype(np.float32)


def _krum(stacks: dict[str, np.ndarray], f: int, m: int) -> list[int]:
    """Indices of the ``m`` (default n - f) updates with the lowest Krum
    scores, best first."""
    n = next(iter(stacks.values())).shape[0]
    dist = np.zeros((n, n), dtype=np.float64)
    for v in stacks.values():
        flat = v.reshape(n, -1).astype(np.float64)
        sq = np.einsum("ij,ij->i", flat, flat)
        dist += sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T
    np.maximum(dist, 0.0, out=dist)
    neighbours = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = np.delete(dist[i], i)
        scores.append(float(np.sort(others)[:neighbours].sum()) if len(others) else 0.0)
    m = m if m > 0 else n - f
    m = min(max(1, m), n)
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]
