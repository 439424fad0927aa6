"""What a round's admitted updates become: defences, then an aggregation rule.

A device's update is a claim: its delta and its sample count are whatever
the device says. Three defences bound what one device can do to the model,
on by default, before any rule runs:

* **finite**: an update that decodes to NaN or Inf is refused on arrival
  (``fold.RoundUpdates.measure``), so is one that would overflow the
  round's float32 sum, and a round whose new model is not finite fails and
  keeps the model (``aggregator.rounds``).
* **norm bound**: every delta longer than a bound is scaled down to it
  (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"). The bound
  adapts to the fleet: ``clip_multiplier`` x the median of the norms of the
  round's first ``CALIBRATION`` updates and of the median norms of the last
  ``HISTORY`` rounds (so that in a small round a few hostile updates cannot
  set their own bound); the first round of a job, with fewer than three
  updates, is not bounded. ``clip = "fixed"`` uses ``clip_norm`` instead.
  The default multiplier, 1.25, is where the bound stops costing rounds on
  non-IID data (at 1, the median, it scales down half of every round's
  updates: 1.2x plain FedAvg's rounds to a target on the demo's digits
  split; at 1.25, 1.04x), while a hostile update still pulls at most 1.25
  times as hard as a median device's (``bench/defaults_cost.py``,
  ``bench/poisoning.py``).
* **weight cap**: no update counts more samples than ``weight_cap`` x the
  median sample count of the same updates and rounds, whatever it claims
  (with 10 devices of equal size and the default 2, one that claims 10^6
  samples carries 2/11 of the round).

A fourth looks at where an update points, since a device can send an
update of honest norm and weight that pulls the wrong way (a sign flip,
flipped labels), which neither bound sees:

* **direction**: the aggregator keeps a momentum of the direction the
  round's devices agreed on: the sum of *every* update the round received,
  admitted or not, each weighted as the mean weighs it (capped samples,
  bounded norm), divided by their total pull (the sum of weight x bounded
  norm), so a weighted mean of their unit vectors: of norm 1 when they all
  agree, near 0 when they cancel (``reference = direction_beta x reference
  + that mean``, one model of memory, checkpointed). The admitted updates'
  part is the round's own sum, so the vote costs nothing per update; a
  left-out update is folded into a second sum. An update
  whose cosine to it is below the round's cutoff is left out of the round
  (its receipt says accepted; the round record lists it in ``left_out``).
  The cutoff is ``direction_tau``, lowered to what the previous round's
  devices showed: the median of their cosines less ``DIRECTION_SPREAD``
  robust deviations (1.4826 x MAD). The first round, with no reference, is
  not filtered; a round whose every update is left out fails and the
  reference is dropped, so a filter can never stop a job.
  Why both: a reference built from the admitted updates only was its own
  echo. On non-IID data, a device left out once kept pointing "away" from
  a reference it no longer fed, and near convergence, where devices'
  updates conflict and their mean is small, honest cosines spread around 0:
  on the poisoning benchmark's digits split, over 400 rounds with no
  attacker, honest devices sat out 53% of their updates, one for 117 rounds
  in a row, and accuracy fell from 96.9% to 90.2%. Every device now has
  one vote in the reference however it is filtered, and the cutoff follows
  the spread honest devices actually show: early in a job (cosines around
  0.5) a sign-flipper's and a label-flipper's updates fall below it; late,
  an update that points against a reference nobody agrees on is no longer
  told from an honest one, and the norm bound is what limits it. An
  attacker who knows the rule can keep its cosine just above the cutoff:
  the norm bound is then what limits it.
  A private round is not filtered and does not move the reference: the
  reference and cutoff are made of single updates, which the privacy
  accountant does not count (and, with distributed noise, an update's
  direction is mostly its noise share's); the clip bounds each update.

The bound and the cap are fixed once the round has ``CALIBRATION`` updates
(or at close, for a smaller round); from then on every update is folded the
moment it arrives. A handful of hostile updates among the first few cannot
move a median of the history and the others.

Then the rule (``[server] aggregation``):

* ``mean``: the weighted mean (FedAvg, McMahan et al. 2017), streamed:
  memory two models and ``CALIBRATION`` bodies, whatever the fleet size.
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

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aggregator.config import configured, configured_keys
from aggregator.fold import Admitted, RoundUpdates, RunningSum
from aggregator.pipeline import Combined, Partial, release
from aggregator.privacy import DpRound, release_private
from fedge.codecs import CodecError, UpdateCodec
from fedge.config import ConfigError
from fedge.tensors import ModelArrays, TensorSpec, dot, l2_norm

if TYPE_CHECKING:
    from aggregator.config import ServerSection

log = logging.getLogger(__name__)

RULES = ("mean", "median", "trimmed_mean", "krum")
CLIPS = ("adaptive", "fixed", "off")
DIRECTIONS = ("momentum", "off")
DENSE_RULES = ("median", "trimmed_mean", "krum")
# Rounds whose median norm and sample count the bound and cap remember.
HISTORY = 10
# Updates of a round kept as received before its bound and cap are fixed.
CALIBRATION = 5
# The largest a coordinate of a round's float32 sum may be allowed to reach.
SUM_LIMIT = 1e37
# The direction filter's cutoff: at most this many robust deviations below
# the median cosine of the previous round's updates (and never above tau).
DIRECTION_SPREAD = 3.0


def direction_cutoff(tau: float, cosines: Sequence[float]) -> float:
    """The cosine below which an update is left out this round, from the
    previous round's updates' cosines to the reference they were held to."""
    if len(cosines) < 3:
        return tau
    med = float(np.median(cosines))
    spread = 1.4826 * float(np.median(np.abs(np.asarray(cosines) - med)))
    return min(tau, med - DIRECTION_SPREAD * spread)


@dataclass(frozen=True, kw_only=True)
class Defences:
    """How a round's updates are bounded and combined: ``[server]`` keys,
    their defaults included."""

    rule: str = configured("server", "aggregation")
    clip: str = configured("server", "clip")
    clip_norm: float = configured("server", "clip_norm")
    clip_multiplier: float = configured("server", "clip_multiplier")
    weight_cap: float = configured("server", "weight_cap")
    trim_fraction: float = configured("server", "trim_fraction")
    krum_f: int = configured("server", "krum_f")
    krum_m: int = configured("server", "krum_m")
    direction: str = configured("server", "direction")
    direction_beta: float = configured("server", "direction_beta")
    direction_tau: float = configured("server", "direction_tau")

    @classmethod
    def from_config(cls, server: ServerSection) -> Defences:
        return cls(**{name: getattr(server, key) for name, (_, key) in configured_keys(cls).items()})


def dense_bytes(spec: TensorSpec, updates: int) -> int:
    """Memory a robust rule needs for ``updates`` dense float32 deltas."""
    params = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in spec.entries)
    return 4 * params * updates + 8 * updates * updates


def check_dense_memory(d: Defences, spec: TensorSpec, max_clients: int, limit: int) -> None:
    """``ConfigError`` when a dense rule would hold more than ``limit``
    bytes of updates (``limits.aggregation_bytes``)."""
    if d.rule in DENSE_RULES and dense_bytes(spec, max_clients) > limit:
        raise ConfigError(
            f"server.aggregation = {d.rule!r} would hold {max_clients} updates of this model dense "
            f"({dense_bytes(spec, max_clients) >> 20} MiB), over limits.aggregation_bytes ({limit >> 20} MiB): "
            "lower selection.max_clients or raise the limit")


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


def sample_cap(samples: Sequence[float], history: Sequence[float], d: Defences) -> float | None:
    """The most samples one update of this round may count, or None."""
    if d.weight_cap <= 0:
        return None
    return d.weight_cap * float(np.median([*samples, *history]))


def _weighing(samples: int, norm: float, bound: float | None, cap: float | None) -> tuple[float, float]:
    """An update's weight (its samples, capped) and the factor that scales
    it down to the norm bound."""
    weight = float(samples) if cap is None else min(float(samples), cap)
    return weight, 1.0 if bound is None or norm <= bound else bound / max(norm, 1e-30)


class RoundAggregate:
    """The open round's admitted updates under the job's defences.

    ``mean`` streams: the first ``CALIBRATION`` updates are kept as
    received; then (or at close, in a smaller round) the norm bound and
    sample cap are fixed, those updates are folded and their bodies dropped,
    and every later update is folded on arrival. The dense rules keep every
    body until ``combine`` at close.
    """

    def __init__(self, spec: TensorSpec, codec: UpdateCodec, d: Defences) -> None:
        self.d = d
        self.updates = RoundUpdates(spec, codec)
        self.stream = d.rule == "mean"
        self.sum = RunningSum(spec)
        # The left-out updates, weighted as the sum weighs the admitted ones
        # (the direction filter's next reference); made on the first one.
        self.left_sum: RunningSum | None = None
        self.reset((), ())

    def reset(self, norm_history: Sequence[float], sample_history: Sequence[float],
              reference: ModelArrays | None = None, dp: DpRound | None = None,
              cutoff: float | None = None) -> None:
        """Forget the round; the next one's bound and cap draw on these
        medians of recent rounds, its direction filter on ``reference``
        with ``cutoff`` (default ``direction_tau``; see ``direction_cutoff``);
        ``dp``: the round is differentially private (see ``DpRound``)."""
        self.updates.reset()
        self.dp = dp
        self.left: list[Admitted] = []  # left out by the direction filter
        self.cosines: dict[str, float] = {}
        # A private round: no filter (see the module's docstring).
        filtered = self.d.direction != "off" and dp is None
        self.cutoff = self.d.direction_tau if cutoff is None else min(cutoff, self.d.direction_tau)
        if self.left_sum is not None:
            self.left_sum.reset()
        self.left_mass = 0.0  # sum of weight x bounded norm of the left-out updates
        self.pull: tuple[ModelArrays, float] | None = None  # a dense rule's weighted sum and its mass, at close
        self.steering = filtered  # whether this round's updates feed the next reference
        self.reference = reference if filtered else None
        self.ref_norm = 0.0 if self.reference is None else l2_norm(self.reference)
        if self.ref_norm == 0.0:
            self.reference = None
        self.sum.reset()
        self.norm_history = tuple(norm_history)
        self.sample_history = tuple(sample_history)
        self.fixed = False
        self.bound: float | None = None
        self.cap: float | None = None
        self.weight = 0.0  # capped samples folded so far: the mean's denominator
        self.mass = 0.0  # sum of |coefficient| x norm: bounds every coordinate of the sum
        self.clipped = 0
        self.capped = 0
        self.bits = 0.0  # adaptive clipping's count of updates within the clip, centred
        if dp is not None:  # the clip (or a noisy update's bound) is the bound, every device weighs one
            self.fixed, self.bound = True, dp.bound

    def __len__(self) -> int:
        return len(self.updates)

    @property
    def items(self) -> list[Admitted]:
        return self.updates.items

    def admit(self, client: str, body: bytes, samples: int, bit: float | None = None, scale: float = 1.0) -> Admitted:
        """Check ``body`` (``RoundUpdates.measure``) and fold or keep it.
        Raises ``CodecError``/``TensorError`` and keeps nothing for a body
        that is not a finite delta of the model's shape, or one whose weight
        and norm would overflow the round's sum. ``bit``: adaptive
        clipping's report, counted with the update (bounded to what an
        honest device could send). ``scale``: a stale update's weight in a
        buffered job (``aggregator.staleness``), applied to the update after
        the defences bound it, never to the mean's denominator."""
        norm = self.updates.measure(body)  # the delta is now in the scratch model
        if self._points_away(client, norm):
            self._fold_left(samples, norm)
            item = Admitted(client, None, int(samples), norm, scale)
            self.left.append(item)
            return item
        if self.stream and self.fixed:
            self._fold_scratch(samples, norm, scale)  # raises before anything is kept
            item = Admitted(client, None, int(samples), norm, scale)
            self.updates.items.append(item)
            if self.dp is not None and self.dp.bit_std > 0:
                limit = self.dp.bit_limit
                self.bits += min(limit, max(-limit, 0.0 if bit is None else bit))
            return item
        item = Admitted(client, bytes(body), int(samples), norm, scale)
        self.updates.items.append(item)
        if self.stream and len(self.updates) >= CALIBRATION:
            self._calibrate()
        return item

    def _points_away(self, client: str, norm: float) -> bool:
        """Whether the update in the scratch model points away from the
        reference direction (cosine below the round's cutoff)."""
        if self.reference is None or norm == 0.0 or not math.isfinite(norm):
            return False
        cosine = dot(self.updates.scratch, self.reference) / (self.ref_norm * norm)
        self.cosines[client] = cosine
        return cosine < self.cutoff

    def _fold_left(self, samples: int, norm: float) -> None:
        """A left-out update's vote for the next reference, weighted as the
        round's sum would weigh it (the bound and cap not fixed yet: those
        of recent rounds)."""
        if not self.steering or norm == 0.0 or not math.isfinite(norm):
            return
        bound = self.bound if self.fixed else norm_bound([], self.norm_history, self.d)
        cap = self.cap if self.fixed else sample_cap([], self.sample_history, self.d) if self.sample_history else None
        weight, factor = _weighing(samples, norm, bound, cap)
        coef = weight * factor
        if not coef > 0 or self.left_mass + coef * norm > SUM_LIMIT:
            return
        if self.left_sum is None:
            self.left_sum = RunningSum(self.updates.spec)
        for name, a in self.updates.scratch.items():  # in place: the scratch is not needed again
            np.multiply(a, np.float32(coef), out=a)
            self.left_sum.acc[name] += a
        self.left_mass += coef * norm

    def agreed_direction(self) -> ModelArrays | None:
        """Where the round's updates, left out or not, pulled together: their
        sum as the round weighs them over their total pull (None: no update
        had a direction, or the round does not steer). Call after
        ``combine``."""
        if not self.steering:
            return None
        if self.stream and not self.fixed and self.items:
            self._calibrate()
        if self.stream:
            admitted, mass = (self.sum.acc, self.mass) if self.fixed else (None, 0.0)
        else:
            admitted, mass = self.pull if self.pull is not None else (None, 0.0)
        total = mass + self.left_mass
        if not total > 0 or not math.isfinite(total):
            return None
        scale = np.float32(1.0 / total)
        out = {}
        for name, _ in self.updates.spec.entries:
            a = np.zeros(self.updates.scratch[name].shape, np.float32) if admitted is None else admitted[name] * scale
            if self.left_mass > 0 and self.left_sum is not None:
                a += self.left_sum.acc[name] * scale
            out[name] = a.astype(np.float32)
        return out

    def _calibrate(self) -> None:
        items = self.updates.items
        self.bound = norm_bound([a.norm for a in items], self.norm_history, self.d)
        self.cap = sample_cap([a.samples for a in items], self.sample_history, self.d)
        self.fixed = True
        kept = list(items)
        items.clear()
        for a in kept:
            self.updates.decode(a.body or b"")
            try:
                self._fold_scratch(a.samples, a.norm, a.scale)
            except CodecError as exc:  # admitted before the bound was known; left out
                log.warning("update from %s left out of the round: %s", a.client, exc)
                continue
            items.append(Admitted(a.client, None, a.samples, a.norm, a.scale))

    def _fold_scratch(self, samples: int, norm: float, scale: float = 1.0) -> None:
        """Add the update in the scratch model, bounded, capped and scaled
        (``admit``), to the sum."""
        weight, factor = _weighing(samples, norm, self.bound, self.cap)
        if self.dp is not None:
            weight = 1.0
        coef = weight * factor * scale
        if self.mass + coef * norm > SUM_LIMIT:
            raise CodecError("overflow", f"an update of norm {norm:.3g} x weight {weight:.3g} would overflow "
                             "the round's sum")
        self.mass += coef * norm
        self.weight += weight
        self.clipped += factor < 1.0
        self.capped += weight < samples
        if coef > 0:
            scale = np.float32(coef)
            for name, a in self.updates.scratch.items():
                np.multiply(a, scale, out=a)
                self.sum.acc[name] += a

    def combine(self) -> Combined:
        """The round's result (call once, at close): the mean of its partial,
        or a private round's release of it."""
        partial = self.partial()
        if self.dp is not None:
            return release_private(partial, self.dp)
        return release(partial)

    def _sum(self) -> ModelArrays:
        """The running sum, copied: the accumulators are the next round's."""
        return {name: a.copy() for name, a in self.sum.acc.items()}

    def partial(self) -> Partial:
        """What the round's admitted updates add up to (call once, at
        close); raises ``ValueError`` when nothing can be released: no update
        admitted (or folded), or every one left out by the direction filter.
        A private round's partial is whatever arrived, none included."""
        items = self.updates.items
        if self.dp is not None:
            norms = [a.norm for a in items] or [0.0]
            return Partial(sum=self._sum(), weight=self.weight, used=tuple(a.client for a in items),
                           bound=self.dp.bound, clipped=int(self.clipped), median_norm=float(np.median(norms)),
                           median_samples=float(np.median([a.samples for a in items] or [0])), bits=self.bits)
        if not items and self.left:
            raise ValueError(f"every update ({len(self.left)}) points away from the direction of recent rounds")
        if not items:
            raise ValueError("no updates admitted")
        if not self.stream:
            partial, self.pull = dense(self.updates, self.d, self.norm_history, self.sample_history,
                                       steering=self.steering)
            return partial
        if not self.fixed:
            self._calibrate()
            items = self.updates.items
            if not items:
                raise ValueError("no update could be folded")
        return Partial(sum=self._sum(), weight=self.weight, used=tuple(a.client for a in items), bound=self.bound,
                       clipped=int(self.clipped), capped=int(self.capped),
                       median_norm=float(np.median([a.norm for a in items])),
                       median_samples=float(np.median([a.samples for a in items])))


def dense(updates: RoundUpdates, d: Defences, norm_history: Sequence[float], sample_history: Sequence[float] = (),
          steering: bool = False) -> tuple[Partial, tuple[ModelArrays, float] | None]:
    """A dense rule's result over every kept body (a mean already: see
    ``Partial.averaged``); the histories hold the median norms and sample
    counts of recent rounds. With ``steering``, also the updates' weighted
    sum (as the mean would weigh them) and its mass (sum of weight x bounded
    norm), for the direction filter's reference; else None."""
    items = updates.items
    if not items:
        raise ValueError("no updates admitted")
    if d.rule not in DENSE_RULES:
        raise ValueError(f"{d.rule!r} is not a dense rule")
    norms = np.array([a.norm for a in items])
    samples = [a.samples for a in items]
    bound = norm_bound(norms.tolist(), norm_history, d)
    clip = np.ones(len(items)) if bound is None else np.minimum(1.0, bound / np.maximum(norms, 1e-30))
    factors = clip * np.array([a.scale for a in items])  # and a buffered job's staleness weights
    cap = sample_cap(samples, sample_history, d)
    weights = np.array([n if cap is None else min(n, cap) for n in samples], dtype=np.float64)
    capped = int(np.count_nonzero(weights < samples))
    stacks = _dense(updates, factors)
    pull = None
    if steering:
        share = weights.astype(np.float32)
        pull = ({k: np.tensordot(share, v, axes=1).astype(np.float32) for k, v in stacks.items()},
                float(np.sum(weights * factors * norms)))
    used = tuple(a.client for a in items)
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result fails the round after
        if d.rule == "median":
            delta = {k: np.median(v, axis=0).astype(np.float32) for k, v in stacks.items()}
        elif d.rule == "trimmed_mean":
            delta = {k: _trimmed(v, d.trim_fraction) for k, v in stacks.items()}
        else:  # krum
            keep = _krum(stacks, d.krum_f, d.krum_m)
            shares = (weights[keep] / weights[keep].sum()).astype(np.float32)
            delta = {k: np.tensordot(shares, v[keep], axes=1).astype(np.float32) for k, v in stacks.items()}
            used = tuple(items[i].client for i in keep)
    partial = Partial(sum=delta, weight=1.0, used=used, bound=bound, clipped=int(np.count_nonzero(clip < 1.0)),
                      capped=capped, median_norm=float(np.median(norms)), median_samples=float(np.median(samples)),
                      averaged=True)
    return partial, pull


def _dense(updates: RoundUpdates, factors: np.ndarray) -> dict[str, np.ndarray]:
    """Every update dense and scaled by its clip factor: name -> (n, *shape)."""
    n = len(updates.items)
    stacks = {name: np.empty((n, *shape), dtype=np.float32) for name, shape in updates.spec.entries}
    for i, item in enumerate(updates.items):
        if item.body is None:
            raise ValueError(f"the update from {item.client} was folded on arrival; a dense rule needs its body")
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
