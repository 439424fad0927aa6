"""Who takes part in a round: pure functions of what the aggregator knows.

The round core (``aggregator.rounds``) asks these; they touch no state.

- ``eligible``: the online devices that can train this job's rounds: trainers
  (not inference-only devices) whose build encodes the uplink codec and
  decodes the downlink's deltas.
- ``select``: a fraction C of the candidates (at least ``min_clients``, at
  most ``max_clients``), drawn without replacement by a generator seeded
  with (job seed, round), so that an aggregator restarted mid-job selects
  the same devices for the same round.
- ``poisson``: each candidate independently with probability q, for jobs
  with differential privacy (``aggregator.privacy``).
- ``quorum_size``: how many of the selected must respond before a round
  may close early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RELAY = "relay"  # a relay's presence role; what a relayed job's root asks of its members


def able(info: Mapping[str, Any], needed_codecs: Sequence[str]) -> bool:
    """Whether a device whose presence says ``info`` can train with these
    codecs; for a relayed job's root (``RELAY`` needed), whether it is a relay."""
    if RELAY in needed_codecs:
        return info.get("role") == RELAY
    if info.get("role", "trainer") != "trainer":
        return False  # inference-only devices never train
    codecs = info.get("codecs")
    # An older build that cannot decode this job's codecs is not.
    return not (isinstance(codecs, list) and not all(n in codecs for n in needed_codecs))


def eligible(online: Mapping[str, Mapping[str, Any]], needed_codecs: Sequence[str]) -> list[str]:
    """Sorted ids of the online devices able to train: ``online`` maps a device
    id to the info of its presence message."""
    return sorted(client for client, info in online.items() if able(info, needed_codecs))


def select(candidates: Sequence[str], *, fraction: float, min_clients: int, max_clients: int, seed: int,
           round_: int) -> tuple[str, ...]:
    """ceil(fraction x candidates) of the sorted ``candidates``, at least
    ``min_clients`` and at most ``max_clients`` (0: no cap), never more than
    there are; the same for the same (seed, round)."""
    k = max(min_clients, math.ceil(fraction * len(candidates) - 1e-9), 1)
    if max_clients:
        k = min(k, max_clients)
    k = min(k, len(candidates))
    rng = np.random.default_rng([seed, round_])
    picked = rng.choice(len(candidates), size=k, replace=False)
    return tuple(sorted(candidates[i] for i in picked))


def poisson(candidates: Sequence[str], *, rate: float, seed: int, round_: int) -> tuple[str, ...]:
    """Each of ``candidates`` independently with probability ``rate``
    (Poisson sampling, what the privacy accountant assumes); any number,
    none included; the same for the same (seed, round)."""
    rng = np.random.default_rng([seed, round_, 0x9015])
    draws = rng.random(len(candidates))
    return tuple(sorted(c for c, u in zip(candidates, draws, strict=True) if u < rate))


def quorum_size(selected: int, quorum: float) -> int:
    """Responses (updates or declines) after which a round of ``selected``
    devices may close before its deadline."""
    return min(max(1, math.ceil(quorum * selected - 1e-9)), selected)
