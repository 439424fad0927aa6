"""What the defences remember from one round to the next.

The norm bound and the weight cap draw on the median update norm and
sample count of the last ``HISTORY`` rounds, so that a few hostile updates
among a round's first cannot set their own bound; the direction filter
holds each round to a momentum of the direction earlier rounds agreed on,
with a cutoff from the spread of the last round's cosines. The rules
themselves are ``aggregator.robust``; this is their memory, checkpointed
with the job (the keys ``norm_history``, ``sample_history``,
``direction_cosines`` and the ``dir/`` arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.robust import HISTORY, Defences, RoundAggregate, direction_cutoff, sample_cap
from fedge.tensors import ModelArrays, TensorSpec

if TYPE_CHECKING:
    from aggregator.pipeline import Combined
    from aggregator.privacy import DpRound

log = logging.getLogger("fedge.aggregator")

_COSINES_KEPT = 100_000  # of a checkpoint's: one per update of the last round


class DefenceHistory:
    """The defences' memory of recent rounds, and the round aggregate's
    set-up from it."""

    def __init__(self, d: Defences, spec: TensorSpec) -> None:
        self.d = d
        self.spec = spec
        self.norms: list[float] = []  # median update norm of recent rounds
        self.samples: list[float] = []  # median sample count of recent rounds
        # A momentum of the direction each round's devices agreed on: the direction filter's
        # reference; and the cosines of the last round's updates to it, which set the next cutoff.
        self.reference: ModelArrays | None = None
        self.cosines: list[float] = []

    def begin(self, agg: RoundAggregate, dp: DpRound | None = None) -> None:
        """Ready ``agg`` for a round: its bound, cap and filter draw on this memory."""
        agg.reset(self.norms, self.samples, self.reference, dp, direction_cutoff(self.d.direction_tau, self.cosines))

    def remember(self, combined: Combined) -> None:
        """A round's medians (of updates the aggregator saw: not a private
        round with none, nor a secure round, whose updates it never sees)."""
        self.norms = [*self.norms[-(HISTORY - 1):], combined.median_norm]
        self.samples = [*self.samples[-(HISTORY - 1):], combined.median_samples]

    def steer(self, agg: RoundAggregate) -> None:
        """Fold the direction the round's devices agreed on (the mean unit
        vector of every update, left out or not: see ``aggregator.robust``)
        into the direction filter's reference, before the server's optimizer
        (whose momentum can overshoot, so that honest devices rightly pull
        back against the change it applied)."""
        if self.d.direction == "off":
            return
        if agg.cosines:
            self.cosines = [float(f"{c:.6g}") for c in agg.cosines.values()]
        delta = agg.agreed_direction()
        if delta is None:
            return
        ref, beta = self.reference, np.float32(self.d.direction_beta)
        self.reference = {k: (delta[k] if ref is None else beta * ref[k] + delta[k]).astype(np.float32)
                          for k in delta}

    def drop_reference(self, round_: int) -> None:
        """A round whose every update was left out: the next is not
        filtered, so that a filter can never stop a job."""
        log.warning("round %d: the direction filter's reference is dropped", round_)
        self.reference = None
        self.cosines = []

    def weights(self, samples: Sequence[int]) -> list[float]:
        """Sample counts as the mean weighs them (capped)."""
        cap = sample_cap(list(samples), self.samples, self.d)
        return [float(n if cap is None or cap <= 0 else min(n, cap)) for n in samples]

    # --- the stage's interface (aggregator.pipeline.Stage) -----------------------

    def announced(self) -> dict[str, Any]:
        return {}  # devices need nothing of it

    def recorded(self, combined: Combined | None) -> dict[str, Any]:
        return {}  # the bound, the clipped and the left out are the record's own fields

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"dir/{k}": v for k, v in self.reference.items()} if self.reference is not None else {}
        return arrays, {"norm_history": self.norms, "direction_cosines": self.cosines, "sample_history": self.samples}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.norms = [float(x) for x in meta.get("norm_history", [])][-HISTORY:]
        self.samples = [float(x) for x in meta.get("sample_history", [])][-HISTORY:]
        ref = {k[len("dir/"):]: np.array(v, dtype=np.float32) for k, v in arrays.items() if k.startswith("dir/")}
        if ref:
            self.spec.check(ref, what="checkpoint direction reference")
        self.reference = ref or None
        self.cosines = [float(c) for c in meta.get("direction_cosines", [])][:_COSINES_KEPT]
