"""A relay's region (``fedge relay``): synchronous rounds among the
region's devices, opened by the root and answered with one sum.

The relay runs the round core with this mode, so its region's rounds are
the aggregator's own: the same selection, announcements (on the region's
channels, ``fedge.topics``), admission, identity checks, defences,
receipts, checkpoint and restart. What differs is where a round starts
and where it ends:

* it **opens** when the root announces that round open with this relay
  selected; the region's round has the root's number and trains the
  root's model (its digest, from the root's announcement: the devices
  fetch the model itself from the job's model channels, where only the
  root publishes, and check the root's signature on it);
* it **closes** (quorum, or ``selection.deadline_s - relays.margin_s``
  after it opened) into a ``RegionSum``: the exact weighted sum of the
  updates it counted (``aggregator.pipeline.Partial``, before anything is
  divided), sent to the root. No model is stepped or published here. A
  region round that counted too few updates declines the root's round.

Exactly once: the sum is checkpointed with the round's close, before it
leaves, and kept until the root's receipt names it. A root that restarts
re-opens its round with the next attempt, and the relay sends the same sum
again; a relay that restarts before its round closed re-opens the region's
round with the next attempt (the devices resend what they kept) and sends
a sum once it closes: the root folds one sum per relay a round, the other
hears ``duplicate``. A round the root has left behind (it closed without
this relay) is abandoned, its devices told by the next announcement.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.events import Action, FromRoot, SaveCheckpoint, SendToRoot
from aggregator.lifecycle import OpenRound, Phase
from aggregator.modes.synchronous import SynchronousRounds
from aggregator.pipeline import Combined
from fedge import wire
from fedge.logs import fields
from fedge.messages import Ack, Decline, ProtocolError, RegionSum, RoundAnnouncement
from fedge.tensors import pack
from fedge.wire import Kind, WireError

if TYPE_CHECKING:
    from aggregator.rounds import RoundCore

log = logging.getLogger("fedge.aggregator")

RECEIPTS = ("accepted", "duplicate", "late", "rejected")  # what the root's receipt for a sum may say


@dataclasses.dataclass
class Sent:
    """The region's answer to a root round, kept until the root's receipt."""

    round: int
    message: RegionSum | Decline
    acked: str = ""  # the root's receipt status, once heard

    @property
    def id(self) -> str:
        return self.message.partial_id if isinstance(self.message, RegionSum) else ""

    def for_attempt(self, attempt: int) -> bytes:
        msg = self.message
        return (dataclasses.replace(msg, attempt=attempt) if isinstance(msg, RegionSum) else msg).encode()


class RelayRounds(SynchronousRounds):
    """The rounds of one region, driven by its root."""

    def __init__(self, core: RoundCore, relay: str) -> None:
        super().__init__(core)
        self.relay = relay
        self.root: RoundAnnouncement | None = None  # the root's latest announcement
        self.digest = core.models.digest  # the root's model, once the root said which
        self.key = (core.models.key_digest, core.models.key_round)
        self.sent: Sent | None = None
        self.restored: dict[str, Any] | None = None
        self.outbox: list[Action] = []

    # --- what the region trains --------------------------------------------------

    @property
    def model_digest(self) -> str:
        return self.digest

    def model_key(self) -> tuple[str, int]:
        return self.key

    # --- the round core's hooks ---------------------------------------------------

    def start(self, now: float, restored: dict[str, Any] | None) -> list[Action]:
        """Nothing opens before the root says so; a round a restart
        interrupted is re-opened when the root's announcement names it."""
        self.restored = restored
        return []

    def from_root(self, event: FromRoot) -> list[Action]:
        c = self.core
        env = event.envelope
        try:
            if env.kind == Kind.ROUND:
                return self._root_round(RoundAnnouncement.parse(env), event.now)
            if env.kind == Kind.ACK:
                return self._root_receipt(Ack.parse(env))
            if env.kind == Kind.INVITE:
                return []  # a root of more relays than it lists: its announcement says so (_chosen)
            raise ProtocolError("kind", f"a {env.kind.name} message on the root's channels")
        except (WireError, ProtocolError) as exc:
            c.counters["root_malformed"] += 1
            log.warning("ignored a message from the root: %s", exc, extra=fields(reason="root_malformed"))
            return []

    def _root_round(self, ann: RoundAnnouncement, now: float) -> list[Action]:
        c = self.core
        if ann.job != c.job:
            c.counters["root_malformed"] += 1
            return []
        if self._older(ann):
            # A replay (signed by the root, but of a round it has left), or a
            # root restarted from older state: its model is not the one trained now.
            c.counters["root_stale"] += 1
            log.warning("ignored the root's announcement of round %d (attempt %d): older than round %d (attempt %d), "
                        "taken already", ann.round, ann.attempt, *self._newest, extra=fields(reason="root_stale"))
            return []
        if ann.state == "open":
            self._newest = (ann.round, ann.attempt)
        self.root = ann
        self.digest, self.key = ann.model_digest, (ann.key_digest, ann.key_round)
        sent = self.sent
        if ann.state == "open" and sent is not None and sent.round == ann.round:
            if sent.acked and ann.attempt == self._sent_attempt:
                return []
            # The root re-opened the round (it restarted), or has not said it has our answer: send it again.
            log.info("round %d: sending the region's answer to the root again (root attempt %d)", ann.round,
                     ann.attempt, extra=fields(round=ann.round))
            self._sent_attempt = ann.attempt
            c.counters["region_resent"] += 1
            return [SendToRoot(sent.for_attempt(ann.attempt), ann.round)]
        if ann.state == "done":
            return self._abandon(now, "the root's job is done") + self.finish_job(now)
        if ann.state != "open" or ann.round < c.next_round:
            return self.try_open(now) if c.open is None else []
        op = c.open
        if op is not None:
            if op.round == ann.round:
                return []  # gathering already (the root's new attempt takes this sum)
            self._abandon(now, f"the root opened round {ann.round}")
        c.next_round = ann.round
        restored, self.restored = self.restored, None
        if (restored and restored.get("round") == ann.round and restored.get("model_digest") == ann.model_digest
                and self._chosen(ann)):
            c.roster.known.update(restored.get("selected", []))
            return self.announce(now, tuple(restored.get("selected", ())), int(restored.get("attempt", 0)) + 1)
        # Settling (selection.settle_s) is for presence arriving in a burst at the start, not before every round.
        return self.try_open(now, settle=not c.history)

    _sent_attempt = -1  # the root attempt the kept answer was last sent for
    _newest = (0, 0)  # the newest open round of the root taken: (round, attempt)

    def _older(self, ann: RoundAnnouncement) -> bool:
        """An announcement of a round before the newest open one taken, or an
        earlier attempt of it. (A waiting or done announcement names the
        next round with the last attempt: only its round is compared.)"""
        newest_round, newest_attempt = self._newest
        if ann.round != newest_round:
            return ann.round < newest_round
        return ann.state == "open" and ann.attempt < newest_attempt
    root_waited = 0  # the round whose wait for the root was announced

    def awaits_devices(self) -> bool:
        """Only while the root's round waits for this region's answer."""
        root, sent, c = self.root, self.sent, self.core
        return (super().awaits_devices() and root is not None and root.state == "open"
                and root.round == c.next_round and self._chosen(root)
                and not (sent is not None and sent.round >= c.next_round))

    def _chosen(self, ann: RoundAnnouncement) -> bool:
        """Whether the root's round asks this relay (listed, or too many to list)."""
        return self.relay in ann.selected or ann.by_invitation

    def _root_receipt(self, ack: Ack) -> list[Action]:
        c = self.core
        sent = self.sent
        if ack.status not in RECEIPTS:
            c.counters["root_malformed"] += 1
            return []
        if sent is None or ack.client != self.relay or ack.round != sent.round or ack.update_id != sent.id:
            c.counters["root_stray_receipt"] += 1
            return []
        if not sent.acked:
            c.counters[f"region_sum_{ack.status}"] += 1
            level = logging.INFO if ack.status in ("accepted", "duplicate") else logging.WARNING
            log.log(level, "round %d: the root's receipt for the region's sum: %s%s", sent.round, ack.status,
                    f" ({ack.reason})" if ack.reason else "", extra=fields(round=sent.round, status=ack.status))
        sent.acked = ack.status
        return []

    def _abandon(self, now: float, why: str) -> list[Action]:
        """Drop the region's open round: the root will not take its sum."""
        c = self.core
        op = c.open
        if op is None:
            return []
        log.warning("round %d: abandoned in the region (%s); its %d update(s) are not counted", op.round, why,
                    len(op.accepted), extra=fields(round=op.round, reason="region_abandoned"))
        c.counters["region_abandoned"] += 1
        c.open, c.secure = None, None
        c.defence_history.begin(c.updates)  # the sum starts empty again
        c.life.close()
        c.life.next_round()
        return []

    def try_open(self, now: float, settle: bool = True) -> list[Action]:
        """A region round opens only while the root's round of that number
        is open, asks this relay and has no answer from it yet."""
        c = self.core
        root = self.root
        if c.next_round > c.policy.rounds:
            return self.finish_job(now)
        answered = self.sent is not None and self.sent.round >= c.next_round
        if root is None or root.state != "open" or root.round != c.next_round or answered or not self._chosen(root):
            return self._waiting(now)
        return super().try_open(now, settle)

    def _waiting(self, now: float) -> list[Action]:
        from aggregator.events import PublishAnnouncement, RoundState

        c = self.core
        if c.life.phase not in (Phase.WAITING, Phase.SETTLING):
            return []
        c.life.too_few()
        # Its own marker: the round's wait for devices, once the root opens it, is logged and announced too.
        if self.root_waited == c.next_round or self.root is None:
            return []
        self.root_waited = c.next_round
        return [PublishAnnouncement(c.announcement(RoundState.WAITING, (), now))]

    # --- closing: a sum for the root, not a model -------------------------------------

    def close(self, now: float, reason: str) -> list[Action]:
        self.outbox = []
        actions = super().close(now, reason)
        # After the checkpoint that keeps it, before anything else: the answer survives a crash once it leaves.
        at = next((i + 1 for i, a in enumerate(actions) if isinstance(a, SaveCheckpoint)), 0)
        out, self.outbox = self.outbox, []
        return [*actions[:at], *out, *actions[at:]]

    def _result(self, op: OpenRound) -> tuple[Combined | None, bool, str | None]:
        combined, key_cut, failure = super()._result(op)
        if failure is not None:
            decline = Decline(self.core.job, op.round, self.relay, f"region_failed: {failure} in region")
            self._answer(op, decline)
        return combined, key_cut, failure

    def _step(self, op: OpenRound) -> tuple[Combined | None, bool, str | None]:
        c = self.core
        try:
            partial = c.updates.partial()
        except ValueError as exc:  # e.g. every update left out by the direction filter
            return self._combine_failed(op, exc)
        if not partial.weight > 0:
            return None, False, "too_few_updates"
        loss = self._train_loss(op)
        msg = RegionSum(
            job=c.job, round=op.round, attempt=self.root.attempt if self.root is not None else 0, sender=self.relay,
            partial_id=f"{op.round}.{op.attempt}", base_model=self.digest, weight=float(partial.weight),
            num_samples=op.num_samples, devices=len(partial.used), selected=len(op.selected),
            declined=len(op.declined - set(op.accepted)), late=op.late, rejected=sum(op.rejected.values()),
            loss=math.nan if loss is None else loss, bound=partial.bound, clipped=partial.clipped,
            capped=partial.capped, median_norm=partial.median_norm, median_samples=partial.median_samples,
            bits=partial.bits, body=pack({k: np.asarray(v, dtype=np.float32) for k, v in partial.sum.items()}),
        )
        self._answer(op, msg)
        c.defence_history.remember(Combined(partial.sum, partial))
        return Combined(partial.sum, partial), False, None

    def _answer(self, op: OpenRound, message: RegionSum | Decline) -> None:
        attempt = self.root.attempt if self.root is not None else 0
        # The root sends no receipt for a decline: it is answered once sent.
        self.sent = Sent(op.round, message, "" if isinstance(message, RegionSum) else "declined")
        self._sent_attempt = attempt
        self.outbox = [SendToRoot(self.sent.for_attempt(attempt), op.round)]

    def _model_after(self, op: OpenRound, ok: bool, key_cut: bool) -> list[Action]:
        return []  # only the root publishes the model

    def round_extra(self, op: OpenRound) -> dict[str, Any]:
        return {"relay": {"region": self.relay, "root_attempt": self._sent_attempt}}

    # --- the checkpoint: the answer kept -----------------------------------------------

    def announced(self) -> dict[str, Any]:
        return {}

    def recorded(self, combined: Combined | None) -> dict[str, Any]:
        return {}

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        sent = self.sent
        if sent is None:
            return {}, {"relay": None}
        body = np.frombuffer(sent.message.encode(), dtype=np.uint8).copy()
        return {"relay/answer": body}, {"relay": {"round": sent.round, "acked": sent.acked}}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        kept = meta.get("relay")
        if not isinstance(kept, dict) or "relay/answer" not in arrays:
            return
        env = wire.decode(arrays["relay/answer"].tobytes(), max_body=1 << 40)
        message: RegionSum | Decline = RegionSum.parse(env) if env.kind == Kind.PARTIAL else Decline.parse(env)
        self.sent = Sent(int(kept["round"]), message, str(kept.get("acked", "")))
