"""The distributed discrete Gaussian mechanism (DDGauss; Kairouz, Liu and
Steinke, ICML 2021): differential privacy in integers, for updates that are
summed by secure aggregation.

A device scales its clipped update to integers, rounds it conditionally
(``round_within``: redrawn until its norm is within ``rounding_bound``, the
sensitivity the noise is sized for) and adds its share of discrete Gaussian
noise (``discrete_gaussian``); the sum of the shares is close to one
discrete Gaussian (``tau`` says how close). The secure-aggregation encoding
of such an input is ``fedge.secagg.quantize_noisy``; the aggregator sizes
the shares (``aggregator.private_rounds``).
"""

from __future__ import annotations

import math

import numpy as np

# Distributed DP in integers: a device's noise is cut at this many standard
# deviations (the mass beyond is below 1e-32), so that the modulus can hold
# the noisy sum by construction, not just with high probability.
NOISE_TAIL = 12.0
# Conditional randomized rounding (Kairouz et al. 2021): sqrt(2 ln(1/beta))
# with beta = exp(-1/2), their choice; a rounding is redrawn until the
# rounded update's norm is within ``rounding_bound``.
ROUNDING_SLACK = 1.0
MAX_ROUNDINGS = 1000


def rounding_bound(levels: int, count: int) -> float:
    """The L2 bound on a clipped update of ``count`` coordinates after
    conditional randomized rounding (Kairouz et al. 2021, the DDGauss
    mechanism): the clip is ``levels`` in integers, and rounding each
    coordinate up or down adds at most ``count / 4`` to the squared norm in
    expectation; a rounding beyond the bound is redrawn. This is the
    sensitivity the integer noise is sized for."""
    c = float(levels)
    return math.sqrt(c * c + count / 4 + ROUNDING_SLACK * (c + math.sqrt(count) / 2))


def round_within(x: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray | None:
    """``x`` rounded at random (up with the probability of its fraction,
    unbiased), redrawn until the result's L2 norm is within ``bound``; None
    after ``MAX_ROUNDINGS`` draws (an input that was not clipped)."""
    limit = bound * bound
    for _ in range(MAX_ROUNDINGS):
        q = np.floor(x + rng.random(x.shape))
        if float(q @ q) <= limit:
            return q.astype(np.int64)
    return None


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator, tail: float = NOISE_TAIL) -> np.ndarray:
    """``size`` draws from the discrete Gaussian N_Z(0, sigma^2), cut at
    ``tail`` deviations: Canonne, Kamath and Steinke's sampler (2020,
    Algorithm 3), vectorized: a discrete Laplace draw (the difference of two
    geometric draws) of scale ``t = floor(sigma) + 1``, kept with
    probability ``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``."""
    out = np.zeros(size, dtype=np.int64)
    if sigma <= 0 or size == 0:
        return out
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)
    filled = 0
    while filled < size:
        k = int((size - filled) * 1.7) + 64
        y = rng.geometric(p, k).astype(np.int64) - rng.geometric(p, k).astype(np.int64)
        keep = rng.random(k) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        y = y[keep & (np.abs(y) <= tail * sigma)]
        take = min(len(y), size - filled)
        out[filled:filled + take] = y[:take]
        filled += take
    return out


def tau(sigma: float, devices: int) -> float:
    """Kairouz et al.'s tau for a sum of ``devices`` discrete Gaussian
    shares of deviation ``sigma``: how far the sum may be from one discrete
    Gaussian (the concentrated-DP epsilon grows by at most ``tau x
    sqrt(coordinates)``). Below 1e-30 once ``sigma`` is a few units."""
    if sigma <= 0 or devices < 2:
        return 0.0
    return 10.0 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, devices))
