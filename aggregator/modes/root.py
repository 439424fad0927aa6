"""The root of a relayed job (``relays.min_relays > 0``): synchronous
rounds whose members are relays, each answering for its region.

A relay (``aggregator.modes.relay``, run by ``fedge relay``) runs the
round among its region's devices with the round core's own machinery
(selection, admission, defences, receipts) and sends the root one
``RegionSum``: the exact weighted sum of the updates its region counted,
their weight and counts. The root selects every relay online, folds the
sums it is sent (``Partial.plus``: adding region sums is adding the
devices' updates), divides by their total weight, steps the server
optimizer and publishes the model, signed with its key, on the job's
model channels that every device reads: a relay never touches the model.

Exactly once: a region's sum is folded at most once a round, whatever
attempt of the root or of the relay made it (a relay answers a restarted
root's new attempt with the sum it kept, and the root that already folded
one hears it as a duplicate). A relay that misses the deadline is left
out, as a device would be, and its late sum is counted ``late``; a relay
whose region could not make a sum declines the round.

The root's CPU per round is that of its relays' sums, whatever the
number of devices behind them.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from aggregator import admission, selection
from aggregator.events import Action, SendAck
from aggregator.lifecycle import OpenRound
from aggregator.modes.synchronous import SynchronousRounds
from aggregator.pipeline import Combined, Partial, release
from fedge.logs import fields
from fedge.messages import Ack, RegionSum, Update
from fedge.tensors import TensorError, unpack

if TYPE_CHECKING:
    from aggregator.rounds import RoundCore

log = logging.getLogger("fedge.aggregator")

# What a region's sum passes before the root folds it: the checks of a
# device's update that read who sent it, for which round and model (a sum
# has no codec and its sample count is the region's).
ROOT_CHECKS: tuple[tuple[str, admission.Check], ...] = tuple(
    (name, check) for name, check in admission.CHECKS
    if name in ("job", "sender", "known", "closed_round", "future_round", "selected", "counted", "base_model"))


class RootRounds(SynchronousRounds):
    """Synchronous rounds of relays: each selected relay's region sum is
    folded once; the round closes when every relay answered (or at the
    deadline) and releases their weighted mean."""

    def __init__(self, core: RoundCore) -> None:
        super().__init__(core)
        self.sum: Partial | None = None  # the open round's region sums, added up
        self.regions: dict[str, dict[str, int]] = {}  # the open round's relays' counts, for its record

    checks: tuple[tuple[str, admission.Check], ...] = (
        ("relayed", lambda core, client, upd: admission.Refuse(
            "not_a_relay", "this job is relayed: devices send their updates to their region's relay")),
    )

    def codecs(self) -> list[str]:
        return [selection.RELAY]  # the root's members are the relays online (their presence says so)

    def announce(self, now: float, selected: tuple[str, ...], attempt: int) -> list[Action]:
        self.sum, self.regions = None, {}
        return super().announce(now, selected, attempt)

    def on_region_sum(self, client: str, msg: RegionSum, now: float) -> list[Action]:
        """A relay's sum for a round: admitted by ``ROOT_CHECKS``, its
        tensors checked against the model, folded and acknowledged."""
        c = self.core
        as_update = cast(Update, msg)  # the checks read job, sender, round and base_model, which both carry
        verdict = admission.admit(c, client, as_update, ROOT_CHECKS)
        if verdict is not None:
            return c._judged(client, as_update, verdict)
        op = c.open
        assert op is not None  # admission refuses a sum when no round is open
        try:
            arrays = unpack(msg.body)
            c.spec.check(arrays, what="region sum")
            if not all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays.values()):
                raise TensorError("nonfinite", "a region sum must be finite float32")
        except TensorError as exc:
            return c._reject(exc.reason, str(exc), client, as_update)
        part = Partial(sum={name: np.array(arrays[name], dtype=np.float32) for name, _ in c.spec.entries},
                       weight=msg.weight, used=(client,), bound=msg.bound, clipped=msg.clipped, capped=msg.capped,
                       median_norm=msg.median_norm, median_samples=msg.median_samples, bits=msg.bits)
        self.sum = part if self.sum is None else self.sum.plus(part)
        self.regions[client] = {"devices": msg.devices, "selected": msg.selected, "declined": msg.declined,
                                "late": msg.late, "rejected": msg.rejected, "samples": msg.num_samples}
        op.accepted[client] = msg.partial_id
        op.num_samples += msg.num_samples
        if math.isfinite(msg.loss):
            op.losses[client] = (msg.loss, msg.num_samples)
        c.counters["accepted"] += 1
        c.counters["region_devices"] += msg.devices
        log.info("round %d: %s's region sum of %d update(s) folded", op.round, client, msg.devices,
                 extra=fields(device=client, round=op.round))
        ack = Ack(c.job, msg.round, op.attempt, client, msg.partial_id, "accepted")
        self.check_quorum(now)
        return [SendAck(client, ack.encode(), "accepted", op.round)]

    def _step(self, op: OpenRound) -> tuple[Combined | None, bool, str | None]:
        if self.sum is None:
            return None, False, "too_few_updates"
        try:
            combined = release(self.sum)
        except ValueError as exc:
            return self._combine_failed(op, exc)
        return self._apply(op, combined)

    def round_extra(self, op: OpenRound) -> dict[str, Any]:
        regions = dict(sorted(self.regions.items()))
        return {"relayed": {
            "relays": len(regions), "devices": sum(r["devices"] for r in regions.values()),
            "selected": sum(r["selected"] for r in regions.values()), "regions": regions}}
