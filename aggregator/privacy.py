"""How much privacy a job has spent: client-level (epsilon, delta) from
Google's ``dp-accounting``, never from our own arithmetic.

The mechanism each round is DP-FedAvg's (McMahan et al. 2018): every device
chosen for the round contributes a delta clipped to L2 norm ``clip``, and
the sum carries Gaussian noise of standard deviation ``noise_multiplier x
clip``. Devices are chosen by Poisson sampling: each enrolled device is in
a round independently with probability ``sampling_rate`` (the selection code
does exactly that, ``aggregator.selection.poisson``), which is what the
accountant's ``PoissonSampledDpEvent`` assumes. A round is then one
``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, and a job of r rounds is
its r-fold self-composition. Adaptive clipping (Andrew et al. 2021) adds a
second Gaussian query per round (the noised count of unclipped updates, with
noise multiplier ``z_b``); with the model's own multiplier ``z_delta`` the
two spend what one Gaussian query of multiplier
``z = (z_delta^-2 + (2 z_b)^-2)^(-1/2)`` spends (their Theorem 1). The job
states ``z``; ``adaptive_noise_multiplier`` gives the ``z_delta`` to use.

Every round is the same event, so the accountant's whole state is the
number of rounds that released a model: restored from the checkpoint, a
round redone after a crash is counted once.

That ``epsilon`` holds against whoever sees the released models but not who
took part in each round: Poisson sampling amplifies privacy only while the
sample is secret. The aggregator chose the sample, the broker routes the
updates, and the events topic names who was accepted; against them the
sampling buys nothing. ``Ledger`` therefore also keeps, for each device, the
Gaussian queries it actually took part in (Gaussian mechanisms compose
exactly: noise multipliers z_i spend what one of ``(sum z_i^-2)^-1/2``
spends), and the job reports the worst device's epsilon when participation
is known, ``epsilon_participant``. With ``distributed`` noise it keeps a
third figure, ``epsilon_aggregator``: what the aggregator itself learns about
the worst device from what it receives before it adds anything. Without
secure aggregation that is each device's update with its own noise share
alone (noise multiplier ``z / sqrt(m)``), which is weak; secure aggregation
lets it see only the sum.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.pipeline import Combined, Partial, PrivateRelease
from fedge.privacy import noise_rng

if TYPE_CHECKING:
    from aggregator.config import PrivacySection

ACCOUNTANTS = ("rdp", "pld")
MODES = ("off", "central", "distributed")

# dp-accounting logs a warning per RDP order it cannot evaluate; the orders
# it drops only make the bound looser, never wrong.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class PrivacySpec:
    """What the accountant needs: the round's mechanism and the job's delta."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        # Named as the job's [privacy] keys: the config check is this check.
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError("privacy.noise_multiplier must be positive")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError("privacy.sampling_rate must be in (0, 1]")
        if not 0 < self.delta < 1:
            raise ValueError("privacy.delta must be in (0, 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}")


@dataclass(frozen=True)
class DpPolicy:
    """A job's differential privacy, from ``[privacy]``.

    ``noise``: ``central`` (the aggregator adds all of it) or ``distributed``
    (each device adds a share, the aggregator tops up what missing devices
    did not add). ``clip_quantile`` > 0 turns on adaptive clipping: ``clip``
    is then where the bound starts, and it moves each round by
    ``exp(-clip_learning_rate x (noised unclipped fraction - quantile))``;
    the noised fraction's sum carries noise of ``clip_bit_noise``."""

    spec: PrivacySpec
    clip: float
    target_epsilon: float = 0.0  # 0: no budget
    noise: str = "central"
    clip_quantile: float = 0.0  # 0: a fixed clip
    clip_learning_rate: float = 0.2
    clip_bit_noise: float = 0.0
    min_devices: int = 1  # N: a round waits for N eligible devices and expects sampling_rate x N of them

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("privacy.clip must be a positive number (the L2 bound on one device's update)")
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            raise ValueError("privacy.target_epsilon must be 0 (no budget) or positive")
        if self.noise not in ("central", "distributed"):
            raise ValueError("privacy.mode must be central or distributed for a private job")
        if self.spec.sampling_rate * self.min_devices < 1 - 1e-9:
            need = math.ceil(1 / self.spec.sampling_rate - 1e-9)
            raise ValueError(
                f"privacy.min_devices: a private round expects sampling_rate x min_devices = "
                f"{self.spec.sampling_rate * self.min_devices:g} devices (sampling_rate {self.spec.sampling_rate:g}, "
                f"min_devices {self.min_devices}), so its noise would swamp the average; set privacy.min_devices "
                f"to the fleet's size, at least {need} (0 takes selection.min_clients)")
        if not 0 <= self.clip_quantile < 1:
            raise ValueError("privacy.clip_quantile must be 0 (a fixed clip) or in (0, 1)")
        if self.adaptive:
            if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
                raise ValueError("privacy.clip_learning_rate must be positive")
            if not (math.isfinite(self.clip_bit_noise) and self.clip_bit_noise > 0):
                raise ValueError("privacy.clip_bit_noise must be positive with adaptive clipping "
                                 "(Andrew et al. suggest the expected devices per round / 20)")
            adaptive_noise_multiplier(self.spec.noise_multiplier, self.clip_bit_noise)  # raises if it cannot

    @classmethod
    def from_config(cls, s: PrivacySection, min_clients: int = 1) -> DpPolicy | None:
        """``min_clients``: selection.min_clients, what privacy.min_devices = 0 means."""
        if s.mode == "off":
            return None
        spec = PrivacySpec(noise_multiplier=s.noise_multiplier, sampling_rate=s.sampling_rate, delta=s.delta,
                           accountant=s.accountant)
        return cls(spec, clip=s.clip, target_epsilon=s.target_epsilon, noise=s.mode, clip_quantile=s.clip_quantile,
                   clip_learning_rate=s.clip_learning_rate, clip_bit_noise=s.clip_bit_noise,
                   min_devices=s.min_devices or max(1, min_clients))

    @property
    def adaptive(self) -> bool:
        return self.clip_quantile > 0

    @property
    def model_noise_multiplier(self) -> float:
        """Of the model's sum: ``noise_multiplier``, less what adaptive
        clipping's bit query spends."""
        z = self.spec.noise_multiplier
        return adaptive_noise_multiplier(z, self.clip_bit_noise) if self.adaptive else z

    def noise_std(self, clip: float) -> float:
        """Of the Gaussian noise on the round's sum, per coordinate."""
        return self.model_noise_multiplier * clip

    @property
    def denominator(self) -> float:
        """The expected number of devices in a round, sampling_rate x
        min_devices: the fixed divisor of the noised sum. Fixed for the job:
        a round that divided by the devices online when it opened would,
        opened with one online, release noise a hundred times too large."""
        return self.spec.sampling_rate * self.min_devices

    def rate(self, candidates: int) -> float:
        """Each of ``candidates`` (at least ``min_devices``) eligible devices
        is sampled with this probability, so that a round expects exactly
        ``denominator`` devices. Never above ``sampling_rate``: each device's
        chance of taking part stays within what the accountant assumes."""
        return min(self.spec.sampling_rate, self.denominator / max(candidates, 1))

    def next_clip(self, clip: float, unclipped: float) -> float:
        """Adaptive clipping's geometric step, from the noised fraction of
        updates that were within the clip."""
        return clip * math.exp(-self.clip_learning_rate * (unclipped - self.clip_quantile))


class Ledger:
    """What each device has spent, for the two figures that do not assume a
    secret sample (see the module's docstring): per device, the sum of
    ``z^-2`` over the Gaussian queries it took part in, for the released
    models and for the aggregator's own view."""

    def __init__(self) -> None:
        self.released: dict[str, float] = {}
        self.aggregator: dict[str, float] = {}

    def add(self, clients: Iterable[str], z_released: float, z_aggregator: float | None) -> None:
        for c in clients:
            self.released[c] = self.released.get(c, 0.0) + z_released ** -2
            if z_aggregator is not None:
                self.aggregator[c] = self.aggregator.get(c, 0.0) + z_aggregator ** -2

    def worst(self, delta: float, accountant: str) -> tuple[float, float | None]:
        """(epsilon_participant, epsilon_aggregator or None) of the worst device."""
        rel = gaussian_epsilon(max(self.released.values(), default=0.0), delta, accountant)
        agg = gaussian_epsilon(max(self.aggregator.values()), delta, accountant) if self.aggregator else None
        return rel, agg

    def to_json(self) -> dict[str, Any]:
        return {"released": dict(self.released), "aggregator": dict(self.aggregator)}

    @classmethod
    def from_json(cls, data: Any) -> Ledger:
        ledger = cls()
        if isinstance(data, dict):
            for name, into in (("released", ledger.released), ("aggregator", ledger.aggregator)):
                for c, v in (data.get(name) or {}).items():
                    into[str(c)] = float(v)
        return ledger


@functools.lru_cache(maxsize=256)
def gaussian_epsilon(rho: float, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of one Gaussian query of noise multiplier
    ``rho^-1/2`` without sampling: what a composition of Gaussians with
    ``sum z_i^-2 = rho`` spends (0 for none)."""
    if rho <= 0:
        return 0.0
    import dp_accounting
    from dp_accounting import pld, rdp

    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(rho ** -0.5))
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def adaptive_noise_multiplier(z: float, z_bits: float) -> float:
    """The noise multiplier of the model query that, with adaptive
    clipping's bit query of multiplier ``z_bits``, spends what the two
    spend together at multiplier ``z`` (Andrew et al. 2021, Theorem 1):
    ``z_delta = (z^-2 - (2 z_bits)^-2)^(-1/2)``."""
    rest = z ** -2 - (2 * z_bits) ** -2
    if not rest > 0:
        raise ValueError(f"privacy.clip_bit_noise = {z_bits:g} leaves no noise for the model at noise_multiplier "
                         f"{z:g}: raise clip_bit_noise above {z / 2:g}")
    return rest ** -0.5


@functools.lru_cache(maxsize=256)
def epsilon(spec: PrivacySpec, rounds: int) -> float:
    """Epsilon at ``spec.delta`` after ``rounds`` rounds (0 for none)."""
    if rounds <= 0:
        return 0.0
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(spec.sampling_rate, dp_accounting.GaussianDpEvent(spec.noise_multiplier)),
        rounds)
    accountant = rdp.RdpAccountant() if spec.accountant == "rdp" else pld.PLDAccountant()
    accountant.compose(event)
    eps = float(accountant.get_epsilon(spec.delta))
    return eps if math.isfinite(eps) else math.inf


def rounds_within(spec: PrivacySpec, target_epsilon: float, limit: int = 100_000) -> int:
    """The most rounds whose epsilon stays within ``target_epsilon``."""
    if epsilon(spec, 1) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi <= limit and epsilon(spec, hi) <= target_epsilon:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon(spec, mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def noise_for_budget(target_epsilon: float, rounds: int, sampling_rate: float, delta: float,
                     accountant: str = "rdp", low: float = 0.05, high: float = 200.0) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``rounds`` rounds at
    ``sampling_rate`` stay within ``target_epsilon`` at ``delta``: how a job
    of a planned length picks its noise."""
    def fits(z: float) -> bool:
        return epsilon(PrivacySpec(z, sampling_rate, delta, accountant), rounds) <= target_epsilon

    if not fits(high):
        raise ValueError(f"no noise multiplier up to {high} keeps {rounds} rounds within epsilon {target_epsilon}")
    if fits(low):
        return low
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


# --- a private round ------------------------------------------------------------


@dataclass(frozen=True)
class DpRound:
    """A differentially private round: every update is clipped to ``clip``
    and weighs one; Gaussian noise of ``noise_std`` per coordinate is added
    to the sum, which is divided by ``denominator`` (fixed before the round:
    the expected number of devices). ``distributed``: each device added a
    share of ``noise_std / sqrt(denominator)`` and the aggregator adds only
    what missing shares leave out; the aggregator cannot clip a noisy
    update to ``clip``, so it bounds it at ``noisy_bound``. ``bit_std`` > 0:
    adaptive clipping, whose count of updates within the clip carries noise
    of ``bit_std``, shared the same way."""

    clip: float
    noise_std: float
    denominator: float
    distributed: bool = False
    noisy_bound: float = 0.0
    bit_std: float = 0.0

    @property
    def bound(self) -> float:
        return self.noisy_bound if self.distributed else self.clip

    @property
    def share(self) -> float:
        """A device's share of the noise, per coordinate (distributed)."""
        return self.noise_std / math.sqrt(self.denominator) if self.distributed else 0.0

    @property
    def bit_share(self) -> float:
        return self.bit_std / math.sqrt(self.denominator) if self.distributed else 0.0

    @property
    def bit_limit(self) -> float:
        """The most one report may move the count: +-1/2, plus a wide margin
        for its noise share (distributed)."""
        return 0.5 + 8.0 * self.bit_share

    def missing(self, shares: int) -> float:
        """The fraction of the noise's standard deviation the aggregator
        adds when ``shares`` updates are in the sum."""
        if not self.distributed:
            return 1.0
        return math.sqrt(max(0.0, 1.0 - shares / self.denominator))


def release_private(partial: Partial, dp: DpRound, noise_scale: float = 1.0) -> Combined:
    """A private round's one release: (the partial's sum of clipped updates +
    Gaussian noise) / the fixed denominator, whatever arrived, none included
    (the accountant counts every round; a round that released nothing when
    nobody was sampled would tell who was). With distributed noise the sum
    already holds one share per update, and the aggregator adds what the
    missing ones would have: the released model always carries the full
    noise. ``noise_scale``: the noise's standard deviation in units of
    ``dp.noise_std`` (secure aggregation's integer shares are sized for the
    sensitivity after rounding, ``aggregator.rounds``). The noise is fresh
    randomness (``fedge.privacy.noise_rng``), never a job's seed."""
    rng = noise_rng()
    missing = dp.missing(len(partial.used))
    noise_std, bit_std = dp.noise_std * noise_scale * missing, dp.bit_std * missing
    delta = {name: ((a + rng.normal(0.0, noise_std, size=a.shape)) / dp.denominator).astype(np.float32)
             for name, a in partial.sum.items()}
    unclipped = None
    if dp.bit_std > 0:
        unclipped = (partial.bits + float(rng.normal(0.0, bit_std))) / dp.denominator + 0.5
    shares = len(partial.used) if dp.distributed else 0
    return Combined(delta, partial, PrivateRelease(shares, noise_std, unclipped))
