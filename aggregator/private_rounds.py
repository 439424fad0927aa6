"""The privacy stage of a job's rounds: what differential privacy keeps from
one round to the next, and what it decides when a round opens and closes.

Across rounds: the clip (which adaptive clipping moves), the number of
private rounds released (the accountant's count), and the ledger of what
each device spent. When a round opens: its ``DpRound`` (clip, noise,
denominator; fixed for the round), the announcement's ``DpPlan``, and the
budget stop (a round that would take the job past
``privacy.target_epsilon`` never opens). When it closes: the release is
``aggregator.privacy.release_private``; ``spend`` counts it and says, for
the round's record, what the job has spent.

The mechanism and the accountant are ``aggregator.privacy``; the devices'
side (clipping, noise shares) is ``fedge.privacy``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.privacy import DpPolicy, DpRound, Ledger, epsilon
from fedge.ddgauss import rounding_bound
from fedge.privacy import DpPlan

if TYPE_CHECKING:
    from aggregator.pipeline import Combined
    from aggregator.secure import SecAggPolicy


# What a job without privacy writes in its checkpoint for them (they were
# always there: checkpoints of every build carry them).
NO_PRIVACY_STATE: dict[str, Any] = {"dp_rounds": 0, "dp_clip": 0.0, "dp_ledger": Ledger().to_json()}


class PrivateRounds:
    """A private job's state across rounds and its decisions per round."""

    def __init__(self, policy: DpPolicy, num_params: int, secagg: SecAggPolicy | None = None) -> None:
        self.policy = policy
        self.num_params = num_params
        self.secagg = secagg
        # Private rounds that computed a noised sum: released, or failed
        # after it was looked at (still counted).
        self.rounds = 0
        self.ledger = Ledger()  # what each device spent, for the figures that do not assume a secret sample
        self.clip = policy.clip  # moves with adaptive clipping
        self.current: DpRound | None = None  # the open round's, fixed when it opens

    # --- a round opens -----------------------------------------------------------

    def over_budget(self) -> float | None:
        """The epsilon one more round would bring the job to, if that is
        over ``privacy.target_epsilon``; else None."""
        dp = self.policy
        if dp.target_epsilon <= 0:
            return None
        spend = epsilon(dp.spec, self.rounds + 1)
        return spend if spend > dp.target_epsilon else None

    def open(self) -> DpRound:
        """The next round's privacy: its clip, noise and denominator."""
        dp = self.policy
        clip, m = self.clip, dp.denominator
        std = dp.noise_std(clip)
        # A distributed round's update (float32: the config allows no other
        # codec) is its clipped delta plus a share of standard deviation
        # std / sqrt(m) per coordinate: its norm stays below
        # clip + share x (sqrt(d) + 8) but with odds too small to matter.
        share = std / math.sqrt(m)
        noisy_bound = clip + share * (math.sqrt(self.num_params) + 8.0)
        self.current = DpRound(clip, std, m, dp.noise == "distributed", noisy_bound,
                               dp.clip_bit_noise if dp.adaptive else 0.0)
        return self.current

    def plan(self) -> DpPlan | None:
        """What the open round's announcement tells the devices."""
        r = self.current
        if r is None:
            return None
        return DpPlan(r.clip, "distributed" if r.distributed else "central", r.share, r.bit_std > 0, r.bit_share)

    def integer_noise(self) -> tuple[float, float]:
        """Distributed privacy with secure aggregation: each device's
        discrete Gaussian share, in integers, for the model coordinates and
        for adaptive clipping's report (DDGauss). The model's share is sized
        for the sensitivity after conditional rounding, so that ``m`` shares
        carry the round's noise multiplier exactly."""
        dp, sa = self.current, self.secagg
        if dp is None or not dp.distributed or sa is None:
            return 0.0, 0.0
        levels = 2 ** (sa.bits - 1) - 1
        z = dp.noise_std / dp.clip
        return (z * rounding_bound(levels, self.num_params) / math.sqrt(dp.denominator),
                dp.bit_share * levels)

    def noise_scale(self) -> float:
        """The noise on a securely aggregated sum, in units of the round's
        ``noise_std``: distributed shares are sized for the sensitivity
        after conditional rounding, and the aggregator tops up in the same
        units; 1 otherwise."""
        dp, sa = self.current, self.secagg
        if dp is None or not dp.distributed or sa is None:
            return 1.0
        levels = 2 ** (sa.bits - 1) - 1
        return rounding_bound(levels, self.num_params) / levels

    # --- a round closes ----------------------------------------------------------

    def spend(self, combined: Combined | None) -> dict[str, Any]:
        """Count a released private round (``combined.private``; None or no
        release: nothing was computed, nothing is counted) and say, for the
        round's record, what the job has spent."""
        dp, r = self.policy, self.current
        assert r is not None
        private = None if combined is None else combined.private
        if combined is not None and private is not None:
            self.rounds += 1
            z = dp.spec.noise_multiplier
            # The aggregator's own view: each update with its share alone, or
            # with secure aggregation only their sum, with all of its shares;
            # central noise protects nothing from it.
            shares = len(combined.used) if self.secagg is not None else 1
            self.ledger.add(combined.used, z, z * math.sqrt(shares / r.denominator) if r.distributed else None)
            if private.unclipped is not None:
                self.clip = dp.next_clip(self.clip, private.unclipped)
        participant, aggregator = self.ledger.worst(dp.spec.delta, dp.spec.accountant)
        extra: dict[str, Any] = {
            "epsilon": round(epsilon(dp.spec, self.rounds), 4), "delta": dp.spec.delta,
            "noise_multiplier": dp.spec.noise_multiplier, "sampling_rate": dp.spec.sampling_rate,
            "dp_clip": float(f"{r.clip:.6g}"), "dp_rounds": self.rounds, "accountant": dp.spec.accountant,
            "dp_noise": "distributed" if r.distributed else "central",
            "epsilon_participant": round(participant, 4),
        }
        if aggregator is not None:
            extra["epsilon_aggregator"] = round(aggregator, 4) if math.isfinite(aggregator) else None
        if private is not None:
            extra["dp_noise_added"] = float(f"{private.noise_std:.6g}")
            if r.distributed:
                extra["dp_noise_shares"] = private.shares
            if private.unclipped is not None:
                extra["dp_unclipped"] = round(private.unclipped, 4)
                extra["dp_next_clip"] = float(f"{self.clip:.6g}")
        return extra

    # --- the stage's interface (aggregator.pipeline.Stage) -----------------------

    def announced(self) -> dict[str, Any]:
        return {"dp": self.plan()}

    def recorded(self, combined: Combined | None) -> dict[str, Any]:
        return self.spend(combined)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """For the checkpoint's metadata (the keys it has always had)."""
        return {}, {"dp_rounds": self.rounds, "dp_clip": self.clip, "dp_ledger": self.ledger.to_json()}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.rounds = int(meta.get("dp_rounds", 0))
        self.ledger = Ledger.from_json(meta.get("dp_ledger"))
        self.clip = float(meta.get("dp_clip") or self.policy.clip)
