"""Synchronous rounds: the default mode (`server.mode = "synchronous"`).

A round opens once enough eligible devices are online (and have settled),
selects a fraction of them (a Poisson sample in a private job), and takes
their updates until a quorum responded (``selection.quorum``), only devices
that went offline are still awaited (after a short grace), or its deadline
passes. Reaching quorum only marks the round due: it closes on the next
tick, so the receipt for the last update leaves before the close's
optimizer step, downlink encoding and checkpoint. At close, with at least
``min_updates`` updates (a private round: whatever arrived, noise alone if
nothing did), the server optimizer turns the released mean into the next
global model; with fewer, the round fails and the model stays. Either way
the job moves on. A secure round first stops taking masked inputs and
unmasks their sum (``unmasking``). The phases and their timers are
``aggregator.lifecycle``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aggregator import admission, selection
from aggregator.events import (
    Action,
    ClientStatus,
    PublishAnnouncement,
    RoundState,
    SaveRoundOpen,
    SendAck,
)
from aggregator.lifecycle import OpenRound, Phase
from aggregator.modes.base import RoundMode
from aggregator.secure import SecureRound
from fedge.logs import fields
from fedge.messages import SYNCHRONOUS, Decline, SecAggStage, Update
from fedge.secagg import SecAggError

if TYPE_CHECKING:
    from aggregator.rounds import RoundCore

log = logging.getLogger("fedge.aggregator")


class SynchronousRounds(RoundMode):
    """Opens and waits for the rounds of ``core`` (``RoundMode`` closes them)."""

    def __init__(self, core: RoundCore) -> None:
        super().__init__(core)
        self.waiting_announced = 0  # the round whose "waiting" announcement went out

    checks = admission.CHECKS  # what an update passes before a round counts it

    # --- the round core's hooks ---------------------------------------------------

    def start(self, now: float, restored: dict[str, Any] | None) -> list[Action]:
        """Re-open the round a restart interrupted (same selection, next
        attempt), or open the next one."""
        c = self.core
        if restored and restored.get("mode", SYNCHRONOUS) != SYNCHRONOUS:
            # The job ran buffered before this start (server.mode changed): its tasks mean nothing to a round.
            log.warning("the saved open round is a buffered job's; server.mode is synchronous now, so the next "
                        "round opens afresh", extra=fields(reason="mode_changed"))
            restored = None
        if restored and restored.get("round") == c.next_round and restored.get("model_digest") == c.model_digest:
            c.roster.known.update(restored.get("selected", []))
            return self.announce(now, tuple(restored.get("selected", ())), int(restored.get("attempt", 0)) + 1)
        return self.try_open(now)

    def announcement_fields(self) -> dict[str, Any]:
        return {}  # a synchronous announcement says nothing of the mode

    def next_deadline(self, stage_ends: float | None) -> float | None:
        return self.core.life.next_deadline(stage_ends)

    def weight(self, upd: Update) -> float:
        return 1.0

    def expects_update_from(self, client: str) -> bool:
        """Selected for the open round, or for the one before (its late
        update gets a receipt)."""
        op = self.core.open
        return (op is not None and client in op.members) or client in self.core.roster.last_selected

    def on_status(self, ev: ClientStatus) -> list[Action]:
        """A device's presence (the roster has it): a selected device back is
        invited again; one gone is no longer waited for; a waiting job may open."""
        c = self.core
        op = c.open
        actions: list[Action] = []
        if ev.online and op is not None and ev.client in op.members:
            if ev.client in op.gone:
                op.gone.discard(ev.client)
                self.check_quorum(ev.now)  # awaited again: no early close for it
            if ev.client not in op.accepted and ev.client not in op.declined and ev.client not in op.refused:
                # Back (a new connection, perhaps to a broker that lost its
                # session): invited again, in case the invite was lost.
                actions = c.invitations([ev.client])
        else:
            if op is not None and ev.client in op.members and ev.client not in op.accepted:
                # A device that went away is not waited for: the round closes
                # on the responses of the others after a short grace (an
                # "offline", true or forged, never holds a round open).
                op.gone.add(ev.client)
                if c.secure is not None:
                    c.secure.absent.add(ev.client)
                self.check_quorum(ev.now)
        if ev.online and c.secure is not None:
            c.secure.absent.discard(ev.client)
        if c.state == RoundState.WAITING:
            return self.try_open(ev.now)
        return actions

    def accepted(self, client: str, upd: Update, now: float) -> list[Action]:
        self.check_quorum(now)
        return []

    def refused(self, client: str, upd: Update, status: str, now: float) -> list[Action]:
        op = self.core.open
        if (op is not None and status == "rejected" and upd.round == op.round and client in op.members
                and client not in op.accepted):
            # Its sender was told the update is refused for good and will not
            # send another: a response, as for quorum, so a round does not
            # wait for its deadline on a device that answered with garbage.
            op.refused.add(client)
            self.check_quorum(now)
        return []

    def takes_decline(self, client: str, dec: Decline) -> bool:
        op = self.core.open
        return op is not None and dec.round == op.round and client in op.members and client not in op.accepted

    def declined(self, client: str, now: float) -> list[Action]:
        assert self.core.open is not None
        self.core.open.declined.add(client)
        return []

    def reinvite(self) -> list[Action]:
        """Invitations again to the open round's devices that have not answered."""
        return self.core.invitations(self.core.unanswered())

    # --- opening and waiting ------------------------------------------------------------

    def answered_without_update(self, op: OpenRound) -> set[str]:
        """Selected devices that answered the round with no update it
        counted: a decline, a refused update (once the round has enough
        without it: on a broker without ACL a forger can refuse a device's
        update in its name, and must not close a round before the real one
        arrives), or, in a secure round, no keys or shares in time. A device
        that declined (for lack of the model, say) and then sent an update
        that was accepted has answered once."""
        c = self.core
        enough = len(op.accepted) >= c.policy.min_updates
        answered = op.declined | (op.refused if enough else set())
        if c.secure is not None:
            answered = answered | c.secure.out_of_round()
        return {client for client in answered if client not in op.accepted}  # O(answered): this runs per update

    def on_timer(self, now: float) -> list[Action]:
        """What is due at ``now``: secure aggregation's next stage, the
        round's close, or (waiting) a new round."""
        c = self.core
        if c.open and c.secure is not None:
            moved = self.advance_secure(now)
            if c.life.phase is not Phase.OPEN:
                return moved  # closed, or still unmasking
            if moved:
                return moved + self.on_timer(now)
        why = c.life.expired(now)
        if why is not None:
            return self.close(now, reason=why)
        if c.state == RoundState.WAITING:
            return self.try_open(now)
        return []

    def on_secagg(self, client: str, msg: SecAggStage, now: float) -> list[Action]:
        """A device's keys, shares or revealed shares for the open attempt."""
        c = self.core
        sec, op = c.secure, c.open
        if sec is None or op is None or (msg.round, msg.attempt) < (op.round, op.attempt):
            # Most often a reveal that came after unmasking had what it needed.
            c.counters["secagg_late"] += 1
            return []
        refused = sec.on_stage(client, msg)
        if refused is not None:
            c.counters[refused] += 1
            op.rejected[refused] += 1
            log.warning("dropped a secagg %s message from %s (%s)", msg.stage, client, refused,
                        extra=fields(device=client, round=msg.round, reason=refused))
            return []
        return self.advance_secure(now)

    def advance_secure(self, now: float, inputs_closed: bool = False) -> list[Action]:
        """Move secure aggregation on (a stage whose devices all answered or
        whose deadline passed ends) and send each device its next message;
        close the round once unmasking has ended."""
        c = self.core
        sec, op = c.secure, c.open
        if sec is None or op is None:
            return []
        before = sec.stage
        actions: list[Action] = [SendAck(m.client, m.encode()) for m in sec.advance(now, inputs_closed)]
        if sec.stage != before:
            self.check_quorum(now)  # who can still send an input has changed
            if sec.stage == "failed" and c.life.phase is Phase.OPEN:
                c.life.mark_due(now)  # nothing more can come of this attempt
        closing = c.life.closing
        if c.life.phase is Phase.UNMASKING and closing is not None and sec.stage in ("done", "failed"):
            actions += self.close(now, closing)
        return actions

    def check_quorum(self, now: float) -> None:
        """Mark the round due once enough selected clients responded; the
        next tick closes it."""
        c = self.core
        op = c.open
        assert op is not None
        enough = len(op.accepted) >= c.policy.min_updates
        answered = self.answered_without_update(op)
        responded = len(op.accepted) + len(answered)
        if c.life.due is None and responded >= selection.quorum_size(len(op.selected), c.policy.quorum):
            c.life.mark_due(now)
            return
        # Only devices that went offline are left: close after a short grace
        # (a device that reconnects at once still makes it), not at the
        # deadline. All gone is not enough: after a broker restart every will
        # fires, and the devices come back with their updates.
        awaited = len(op.selected) - len(op.gone - answered)
        if enough and responded >= awaited:
            c.life.await_offline(now, c.policy.offline_grace_s)
        else:
            c.life.await_all()

    def select(self, candidates: list[str]) -> tuple[str, ...]:
        c = self.core
        p = c.policy
        if p.privacy is not None:
            return selection.poisson(candidates, rate=p.privacy.rate(len(candidates)), seed=p.seed,
                                     round_=c.next_round)
        return selection.select(candidates, fraction=p.fraction, min_clients=p.min_clients,
                                max_clients=p.max_clients, seed=p.seed, round_=c.next_round)

    def try_open(self, now: float, settle: bool = True) -> list[Action]:
        c = self.core
        if c.next_round > c.policy.rounds:
            return self.finish_job(now)
        # A private round divides its noised sum by the cohort it expects of
        # min_devices devices: it never opens with fewer.
        needed = self.needed()
        # Counted, not listed: asked at every presence while a round waits.
        count = c.roster.eligible_count(self.codecs(), c.next_round, needed)
        if count < needed:
            c.life.too_few()
            if self.waiting_announced != c.next_round:
                self.waiting_announced = c.next_round
                log.info("round %d waits for %d eligible clients online (%d now)%s", c.next_round, needed,
                         count, "" if needed == c.policy.min_clients else " (privacy.min_devices)")
                return [PublishAnnouncement(c.announcement(RoundState.WAITING, (), now))]
            return []
        if settle and c.policy.settle_s > 0 and not c.life.settled(now, c.policy.settle_s):
            return []
        candidates = self.eligible()
        stop = self.budget_stop(now)
        if stop is not None:
            return stop
        return self.announce(now, self.select(candidates), 1)

    def announce(self, now: float, selected: tuple[str, ...], attempt: int) -> list[Action]:
        c = self.core
        c.attempt = attempt
        c.round_dp = c.private.open() if c.private is not None else None
        c.secure, c.secure_failure = None, ""
        if c.policy.secagg is not None:
            # Every attempt its own keys and masks: a restarted round is a new attempt.
            try:
                noise, aux = c.private.integer_noise() if c.private is not None else (0.0, 0.0)
                plan = c.policy.secagg.plan(len(selected), c.round_dp.clip if c.round_dp else 0.0, noise,
                                               aux)
                count = c.spec.num_params + (1 if c.round_dp is not None and c.round_dp.bit_std > 0 else 0)
                c.secure = SecureRound(c.job, c.next_round, attempt, selected, plan, count,
                                          c.policy.secagg.stage_s, now)
            except SecAggError as exc:
                c.secure_failure = str(exc)
                log.error("round %d: %s; the round fails", c.next_round, exc,
                          extra=fields(round=c.next_round, reason="secagg_failed"))
        msg = c.announcement(RoundState.OPEN, selected, now)
        fanout = max(len(c.roster.online), len(selected))
        c.open = OpenRound(
            round=c.next_round, attempt=attempt, selected=selected, opened_at=now,
            bytes_down=c.published_bytes + len(msg) * fanout,
        )
        invites = c.invitations(selected)  # a round too large to list in msg
        c.open.bytes_down += sum(len(i.message) for i in invites if isinstance(i, SendAck))
        c.defence_history.begin(c.updates, c.round_dp)
        c.life.announce(now, c.policy.deadline_s)
        if c.policy.secagg is not None and c.secure is None:
            c.life.mark_due(now)  # too few devices to aggregate securely: close at the next tick
        if not selected:
            c.life.mark_due(now)  # an empty Poisson sample: nobody to wait for (a private round releases noise)
        record = {"round": c.next_round, "attempt": attempt, "selected": list(selected),
                  "model_digest": c.model_digest}
        return [SaveRoundOpen(record), PublishAnnouncement(msg), *invites]
