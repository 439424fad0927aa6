"""A device's side of one securely aggregated round attempt, without I/O.

``SecureSession`` wraps ``fedge.secagg.SecAggClient`` with the order in
which things reach a device: the announcement starts it (it sends its public
keys at once, while it trains), the aggregator's ``keyset`` brings its
neighbours' keys (it answers with sealed shares), ``routed`` brings the
shares addressed to it, training brings the update (made integers at the
plan's scale), and when both of the last two are here it has its masked
input; ``survivors`` asks it to reveal. Messages out of turn are refused
with a reason; nothing raises out of here. A new attempt is a new session:
keys and seeds are never reused.
"""

from __future__ import annotations

import logging

import numpy as np

from fedge.messages import SecAggStage
from fedge.secagg import Context, SecAggClient, SecAggError, SecAggPlan, pack, quantize, quantize_noisy

log = logging.getLogger("fedge.agent")


class SecureSession:
    def __init__(self, me: str, job: str, round_: int, attempt: int, plan: SecAggPlan) -> None:
        self.me, self.job, self.round, self.attempt, self.plan = me, job, round_, attempt, plan
        self.client = SecAggClient(me, plan, Context(job, round_, attempt))
        self.routed: SecAggStage | None = None
        self.input: np.ndarray | None = None
        self.sent_body = False
        self.refusals: dict[str, int] = {}

    def keys(self) -> SecAggStage:
        c, s = self.client.advertise()
        return self._msg("keys", (self.me,), (c + s,))

    def on_stage(self, msg: SecAggStage) -> SecAggStage | str | None:
        """The aggregator's keyset, routed shares or survivors: the message to
        send back (or None: nothing to send yet), or a refusal's reason."""
        if (msg.job, msg.round, msg.attempt, msg.client) != (self.job, self.round, self.attempt, self.me):
            return self._refuse("secagg_wrong_round")
        try:
            if msg.stage == "keyset":
                if self.client.graph:
                    return self._refuse("secagg_duplicate")
                keys = {u: (b[:32], b[32:]) for u, b in zip(msg.ids, msg.blobs, strict=True)}
                sealed = self.client.share(keys, msg.peers)
                return self._msg("shares", tuple(sealed), tuple(sealed.values()))
            if msg.stage == "routed":
                if not self.client.graph or self.routed is not None:
                    return self._refuse("secagg_out_of_turn")
                self.routed = msg
                return None
            if msg.stage == "survivors":
                if not self.sent_body:
                    return self._refuse("secagg_out_of_turn")
                out = self.client.unmask(msg.peers)
                ids = tuple(out)
                return self._msg("reveal", ids, tuple(out[u][2] for u in ids), kinds="".join(out[u][0] for u in ids),
                                 indices=tuple(out[u][1] for u in ids))
        except SecAggError as exc:
            log.warning("%s: secure aggregation of round %d: %s", self.me, self.round, exc)
            return self._refuse("secagg_refused")
        return self._refuse("secagg_out_of_turn")

    def set_update(self, flat: np.ndarray, rng: np.random.Generator, model: int | None = None) -> None:
        """The update to add (clipped when private), flattened in the model's
        tensor order; its first ``model`` coordinates are the model's (the
        rest: adaptive clipping's report). With distributed privacy the
        plan's integer noise is added here (``quantize_noisy``)."""
        if self.plan.noise or self.plan.aux_noise:
            self.input = quantize_noisy(flat, self.plan, rng, len(flat) if model is None else model)
        else:
            self.input = quantize(flat, self.plan, rng)

    def masked_body(self) -> bytes | None:
        """The masked input, packed, once the update and the routed shares
        are both here (once per session)."""
        if self.input is None or self.routed is None or self.sent_body:
            return None
        r = self.routed
        try:
            y = self.client.masked_input(self.input, dict(zip(r.ids, r.blobs, strict=True)), r.peers)
        except SecAggError as exc:
            log.warning("%s: secure aggregation of round %d: %s", self.me, self.round, exc)
            self._refuse("secagg_refused")
            return None
        self.sent_body = True
        return pack(y, self.plan.modulus_bits)

    def _msg(self, stage: str, ids: tuple[str, ...], blobs: tuple[bytes, ...], kinds: str = "",
             indices: tuple[int, ...] = ()) -> SecAggStage:
        return SecAggStage(self.job, self.round, self.attempt, self.me, stage, ids, blobs, kinds=kinds,
                           indices=indices)

    def _refuse(self, reason: str) -> str:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return reason
