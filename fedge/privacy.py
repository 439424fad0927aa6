"""Client-level differential privacy: what both roles agree on.

A job with ``[privacy]`` on announces a ``DpPlan`` inside each round's
training plan. A device clips its update (the delta it is about to encode,
error-feedback residual included) to L2 norm ``clip`` before compression and,
when the noise is ``distributed``, adds its own Gaussian share of standard
deviation ``noise_std`` per coordinate. The aggregator clips again on
arrival (a device that skips the clip gains nothing), sums, adds the central
noise when the noise is ``central``, and divides by a denominator fixed
before the round (the expected number of contributions), so that one
device moves the result by at most ``clip / denominator``.

Compression comes after the clip and the noise share: the stochastic
quantizers are unbiased, and their rounding error, bounded by the scale of
each block, adds variance on top of the Gaussian noise (never less noise).
In ``central`` mode the aggregator's clip after decoding is what bounds a
device's contribution, so a quantized update a little longer than ``clip``
is scaled back to it. In ``distributed`` mode the aggregator cannot clip
again (a noisy update is far longer than ``clip``, and scaling it down would
shrink the noise share); it trusts each device's own clip, which is what the
device's privacy rests on, and bounds only what a broken device could do to
the model.

With adaptive clipping (``bit``) a device also reports whether its update
was within the clip, centred as +1/2 or -1/2 (so that one device moves the
count by at most 1/2), plus its own share of that count's noise when the
noise is distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.tensors import ModelArrays, l2_norm

NOISE = ("central", "distributed")


@dataclass(frozen=True)
class DpPlan:
    """The round's privacy plan, as devices read it from the announcement."""

    clip: float  # L2 bound on one device's update
    noise: str  # central (the aggregator adds it) or distributed (each device adds its share)
    noise_std: float  # a device's share per coordinate (distributed), else 0
    bit: bool = False  # adaptive clipping: report whether the update was within the clip
    bit_std: float = 0.0  # a device's share of the noise on that report (distributed), else 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("dp clip must be a positive number")
        if self.noise not in NOISE:
            raise ValueError(f"dp noise must be one of {', '.join(NOISE)}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError("dp noise_std must be a finite number >= 0")
        if not (math.isfinite(self.bit_std) and self.bit_std >= 0):
            raise ValueError("dp bit_std must be a finite number >= 0")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clip": self.clip, "noise": self.noise, "noise_std": self.noise_std}
        if self.bit:
            out.update(bit=True, bit_std=self.bit_std)
        return out

    @classmethod
    def from_json(cls, data: Any) -> DpPlan:
        if not isinstance(data, dict):
            raise ValueError("dp plan must be an object")
        clip, noise, std = data.get("clip"), data.get("noise"), data.get("noise_std", 0.0)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise ValueError("dp clip must be a number")
        if isinstance(std, bool) or not isinstance(std, (int, float)):
            raise ValueError("dp noise_std must be a number")
        if not isinstance(noise, str):
            raise ValueError("dp noise must be a string")
        bit, bit_std = data.get("bit", False), data.get("bit_std", 0.0)
        if not isinstance(bit, bool):
            raise ValueError("dp bit must be true or false")
        if isinstance(bit_std, bool) or not isinstance(bit_std, (int, float)):
            raise ValueError("dp bit_std must be a number")
        return cls(float(clip), noise, float(std), bit, float(bit_std))


def clip_update(arrays: ModelArrays, clip: float) -> tuple[ModelArrays, bool]:
    """``arrays`` scaled down to L2 norm ``clip`` if longer (a new dict);
    and whether it was."""
    norm = l2_norm(arrays)
    if norm <= clip:
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}, False
    factor = np.float32(clip / norm)
    return {k: (np.asarray(v, dtype=np.float32) * factor).astype(np.float32) for k, v in arrays.items()}, True


def clip_bit(within: bool, std: float, rng: np.random.Generator) -> float:
    """Adaptive clipping's report: +1/2 if the update was ``within`` the
    clip, else -1/2; plus N(0, std^2) when ``std`` > 0."""
    bit = 0.5 if within else -0.5
    return bit + float(rng.normal(0.0, std)) if std > 0 else bit


def add_noise(arrays: ModelArrays, std: float, rng: np.random.Generator) -> ModelArrays:
    """``arrays`` plus independent N(0, std^2) per coordinate (a new dict)."""
    if std <= 0:
        return dict(arrays)
    return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) for k, v in arrays.items()}


def privatize(target: ModelArrays, plan: DpPlan, rng: np.random.Generator) -> tuple[ModelArrays, bool, float | None]:
    """What a device does to the delta it is about to encode: clip it to
    ``plan.clip``, report the clip when asked (adaptive clipping), add its
    noise share (distributed). Returns (what to encode, whether it was
    clipped, the report or None)."""
    clipped_target, clipped = clip_update(target, plan.clip)
    bit = clip_bit(not clipped, plan.bit_std, rng) if plan.bit else None
    return add_noise(clipped_target, plan.noise_std, rng), clipped, bit


def noise_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy: noise that
    protects privacy must not be predictable from a job's seed."""
    return np.random.default_rng(np.random.SeedSequence())
