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
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aggregator.config import PrivacySection

ACCOUNTANTS = ("rdp", "pld")
MODES = ("off", "central")

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
    """A job's differential privacy, from ``[privacy]``."""

    spec: PrivacySpec
    clip: float
    target_epsilon: float = 0.0  # 0: no budget

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("privacy.clip must be a positive number (the L2 bound on one device's update)")
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            raise ValueError("privacy.target_epsilon must be 0 (no budget) or positive")

    @classmethod
    def from_config(cls, s: PrivacySection) -> DpPolicy | None:
        if s.mode == "off":
            return None
        return cls(PrivacySpec(s.noise_multiplier, s.sampling_rate, s.delta, s.accountant), s.clip, s.target_epsilon)

    @property
    def noise_std(self) -> float:
        """Of the Gaussian noise on the round's sum, per coordinate."""
        return self.spec.noise_multiplier * self.clip

    def denominator(self, candidates: int) -> float:
        """The expected number of devices in a round of ``candidates``
        eligible ones: the fixed divisor of the sum (at least 1)."""
        return max(1.0, self.spec.sampling_rate * candidates)


def adaptive_noise_multiplier(z: float, z_bits: float) -> float:
    """The noise multiplier of the model query that, with adaptive
    clipping's bit query of multiplier ``z_bits``, spends what the two
    spend together at multiplier ``z`` (Andrew et al. 2021, Theorem 1):
    ``z_delta = (z^-2 - (2 z_bits)^-2)^(-1/2)``."""
    rest = z ** -2 - (2 * z_bits) ** -2
    if not rest > 0:
        raise ValueError(f"a bit-query noise multiplier of {z_bits} leaves nothing for the model at {z}: raise it")
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
