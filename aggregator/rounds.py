"""The aggregator's round core: a state machine with no I/O. Everything that
decides what a job's rounds do is reached from here; nothing here touches a
socket, a file or a clock.

Theory of operation
-------------------
The shell (``aggregator.service``) feeds events (``ClientStatus``,
``MessageArrived``, ``TimerFired``, ``Incident``; ``aggregator.events``)
with the current monotonic time and carries out the actions returned, in
order; ``next_deadline()`` says when to tick next.

The core holds what every kind of round shares, each concern in a module of
its own:

* the **lifecycle** (``aggregator.lifecycle``): waiting, settling, open,
  unmasking, closing, done; its transitions are a table;
* the **mode** (``aggregator.modes``): when a round opens, whom it selects,
  when it is due (synchronous rounds, or buffered asynchronous
  aggregation, whose rounds are model versions); closing is shared;
* **admission** (``aggregator.admission``): the ordered checks an update
  passes before a round may count it; the core turns a refusal into a
  counter and, when the sender can be told, a ``rejected``/``late``
  receipt;
* the **aggregation pipeline** (``aggregator.pipeline``): the defences and
  rules folding each admitted update (``aggregator.robust``) and their
  memory (``aggregator.defences``), secure aggregation
  (``aggregator.secure``) and differential privacy
  (``aggregator.private_rounds``), ending in a ``Partial`` that the round
  releases as its mean;
* the **roster** (``aggregator.roster``): devices known, online, benched;
* the **model lineage** (``aggregator.lineage``): the exact server model,
  the latest key and the published model devices train from; the core
  publishes a key (``PublishModel``) every ``key_every`` rounds and a delta
  from it (``PublishDelta``) in between.

A device's decline (it cannot train, or cannot build the announced model)
is an answer: it counts towards the quorum, and a decline for lack of the
model makes the core publish the key and delta again.

Exactly once
------------
An update is identified by (job, round, client, update id). Per round the
core keeps the set of clients it has folded; a second copy (QoS 1
redelivery, an agent's resend) is acknowledged as ``duplicate`` and never
folded. The running sum and that set live and die together: a crash loses
both, so the restarted core re-opens the same round (same selection, next
``attempt``) with an empty sum, the agents resend the update they kept, and
each is folded once into the sum that is finally applied.

Durability
----------
When a round closes the core emits ``SaveCheckpoint`` before anything about
the next round leaves: a crash after it resumes after that round, a crash
before it redoes that round. When a round opens, ``SaveRoundOpen`` records
its selection so a restart re-announces the same round to the same clients.

A checkpoint holds the model lineage, the optimizer's state and each
stage's ``state()`` (roster, defence history, privacy), under keys that
have not changed since format 2: checkpoints of older builds resume
(``tests/unit/test_old_checkpoints.py``).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from aggregator import admission
from aggregator.defences import DefenceHistory
from aggregator.events import (
    Action,
    ClientStatus,
    Event,
    FromRoot,
    Incident,
    MessageArrived,
    PublishAnnouncement,
    PublishDelta,
    PublishModel,
    RoundFinished,
    RoundState,
    SaveCheckpoint,
    SaveRoundOpen,
    SendAck,
    TimerFired,
)
from aggregator.lifecycle import Lifecycle, OpenRound, Phase
from aggregator.lineage import ModelLineage
from aggregator.modes import BufferedRounds, SynchronousRounds
from aggregator.modes.root import RootRounds
from aggregator.optimizers import ServerOptimizer
from aggregator.pipeline import Stage
from aggregator.policy import RoundPolicy
from aggregator.privacy import DpRound
from aggregator.private_rounds import NO_PRIVACY_STATE, PrivateRounds
from aggregator.robust import RoundAggregate, check_dense_memory
from aggregator.roster import Roster
from aggregator.secure import SecureRound, warn_unseen_defences
from fedge import wire
from fedge.codecs import CodecError, make_codec
from fedge.identity import IdentityError
from fedge.logs import fields
from fedge.messages import (
    MODEL_UNAVAILABLE,
    Ack,
    Decline,
    Invite,
    ProtocolError,
    RegionSum,
    RoundAnnouncement,
    SecAggStage,
    TrainingPlan,
    Update,
)
from fedge.records import RoundRecord
from fedge.secagg import CODEC as SECAGG_CODEC
from fedge.secagg import SecAggPlan
from fedge.tensors import ModelArrays, TensorError
from fedge.wire import Envelope, Kind, WireError

# The round core's interface, for the shells and the tests (the events and
# actions are defined in aggregator.events).
__all__ = [
    "Action", "ClientStatus", "Event", "Incident", "MessageArrived", "PublishAnnouncement", "PublishDelta",
    "PublishModel", "RoundCore", "RoundFinished", "RoundPolicy", "RoundState", "SaveCheckpoint", "SaveRoundOpen",
    "SendAck", "TimerFired",
]

log = logging.getLogger("fedge.aggregator")

def _finite(arrays: ModelArrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values())


def _named_in(env: Envelope | None) -> tuple[int, str] | None:
    """(round, update id) from the header of an update that broke the
    protocol elsewhere, so its sender learns why instead of resending the
    same bytes until its round ends."""
    h = env.header if env is not None and env.kind == Kind.UPDATE else {}
    round_, update_id = h.get("round"), h.get("update_id")
    if isinstance(round_, int) and not isinstance(round_, bool) and isinstance(update_id, str):
        return round_, update_id[:64]
    return None


class RoundCore:
    def __init__(
        self,
        *,
        job: str,
        policy: RoundPolicy,
        plan: TrainingPlan,
        codec: dict[str, Any],
        optimizer: ServerOptimizer,
        model_factory: str,
        model_args: dict[str, Any],
        initial_model: ModelArrays,
        downlink: dict[str, Any] | None,
        key_every: int,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        verify: Callable[[str, Envelope], None] | None = None,
    ) -> None:
        """``downlink`` is the delta codec (None: a full model every round);
        ``new_id`` makes the ids the core hands out (checkpoint ids), so
        that tests can make them deterministic. ``verify(client, envelope)``
        checks who made an update or decline (``fedge.identity``): it raises
        ``IdentityError`` to refuse it; None accepts unsigned messages."""
        self.job, self.policy, self.plan = job, policy, plan
        self.optimizer = optimizer
        self.models = ModelLineage(
            job=job, factory=model_factory, factory_args=model_args, initial=initial_model,
            downlink=downlink or {"name": "none"}, key_every=key_every, seed=policy.seed,
        )
        self.spec = self.models.spec
        self._stages(policy, codec)
        self.next_round, self.attempt = 1, 0
        self.new_id, self.verify = new_id, verify
        self.life = Lifecycle()  # where the job's rounds are, and the phase's timers
        # When rounds open and close (aggregator.modes).
        self.mode: SynchronousRounds | BufferedRounds = (
            BufferedRounds(self, policy.buffered) if policy.buffered is not None
            else RootRounds(self) if policy.tree == "root" else SynchronousRounds(self))
        if isinstance(self.mode, BufferedRounds):
            self.stages.append(self.mode)  # its tasks counted and versions kept, checkpointed
        self.open: OpenRound | None = None
        self.roster = Roster(policy.max_devices)  # devices known, online and benched
        self._now = 0.0  # the time of the event being handled
        # What the job counted; and the same counts, by kind, for metrics:
        # updates refused (by reason; "late" included) and rounds failed.
        self.counters: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.history: list[RoundRecord] = []  # the last few records, for restarts
        self._restored_open: dict[str, Any] | None = None

    def _stages(self, policy: RoundPolicy, codec: dict[str, Any]) -> None:
        """The aggregation pipeline's stages (``aggregator.pipeline``)."""
        # A securely aggregated job's updates are masked integers (the round's
        # SecAggPlan), announced as the "secagg" codec; the configured codec
        # is then unused.
        self.codec_params = dict(SECAGG_CODEC) if policy.secagg is not None else dict(codec)
        self.codec = make_codec(codec)
        check_dense_memory(policy.defences, self.spec, policy.max_clients, policy.aggregation_bytes)
        if policy.secagg is not None:
            warn_unseen_defences(policy.defences)
        self.updates = RoundAggregate(self.spec, self.codec, policy.defences)
        self.defence_history = DefenceHistory(policy.defences, self.spec)
        # A private job's state across rounds (clip, accountant's count, ledger).
        self.private = (PrivateRounds(policy.privacy, self.spec.num_params, policy.secagg)
                        if policy.privacy is not None else None)
        # The stages that keep state across rounds (aggregator.pipeline.Stage).
        self.stages: list[Stage] = [self.defence_history, *([self.private] if self.private is not None else [])]
        self.round_dp: DpRound | None = None  # the open round's privacy, fixed when it opens
        self.secure: SecureRound | None = None  # the open attempt's secure aggregation
        self.secure_failure = ""  # why the open attempt could not start secure aggregation

    def relay_region(self, relay: str) -> None:
        """Make this core a relay's (``aggregator.modes.relay``): its rounds
        are its region's, opened by the root and answered with a sum. Call
        before ``restore``."""
        from aggregator.modes.relay import RelayRounds

        self.mode = RelayRounds(self, relay)
        self.stages.append(self.mode)  # the region's answer, kept until the root's receipt

    # --- public --------------------------------------------------------------

    @property
    def model_digest(self) -> str:
        """State digest of the model devices train from this round (a
        relay's: its root's)."""
        return self.mode.model_digest

    def start(self, now: float) -> list[Action]:
        """Publish the current key and delta, then open (or re-open) a round."""
        actions: list[Action] = [PublishModel(self.models.key_message), PublishDelta(self.models.delta_message)]
        restored, self._restored_open = self._restored_open, None
        return actions + self.mode.start(now, restored)

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, ClientStatus):
            return self._on_status(event)
        if isinstance(event, MessageArrived):
            return self._on_message(event)
        if isinstance(event, TimerFired):
            return self._on_timer(event.now)
        if isinstance(event, Incident):
            self.counters[event.reason] += 1
            return []
        if isinstance(event, FromRoot):
            self._now = event.now
            return self.mode.from_root(event)
        raise TypeError(f"unknown event {event!r}")

    def exact_model_message(self) -> bytes:
        """The exact server model as a full model message, for exporters."""
        return self.models.exact_message()

    def expects_update_from(self, client: str) -> bool:
        """Whether ``client`` may send an update now (the mode says: selected
        for the open round or the one before; a buffered job's task)."""
        return self.mode.expects_update_from(client)

    @property
    def state(self) -> RoundState:
        """What the announcements say: waiting (settling included), open
        (unmasking and closing included) or done; ``life.phase`` has the rest."""
        return RoundState(self.life.phase.announced)

    def next_deadline(self) -> float | None:
        sec = self.secure
        stage_ends = None
        if sec is not None and (self.life.phase is Phase.UNMASKING or sec.stage in ("keys", "shares")):
            stage_ends = sec.deadline
        return self.mode.next_deadline(stage_ends)

    # --- events --------------------------------------------------------------

    def _on_status(self, ev: ClientStatus) -> list[Action]:
        if not self.roster.heard(ev.client, ev.online, ev.info):
            self.counters["too_many_devices"] += 1
            return []
        return self.mode.on_status(ev)

    def _on_timer(self, now: float) -> list[Action]:
        return self.mode.on_timer(now)

    def _reject(self, reason: str, detail: str, client: str, upd: Update | None,
                named: tuple[int, str] | None = None) -> list[Action]:
        """Count and log a refused message; the sender gets a receipt when the
        update (or, for a malformed one, its header: ``named``) gives its
        round and update id."""
        self.counters[reason] += 1
        self.rejections[reason] += 1
        if self.open:
            if reason == "late":
                self.open.late += 1
            else:
                self.open.rejected[reason] += 1
        log.warning("dropped message from %s: %s (%s)", client, detail, reason,
                    extra=fields(device=client, reason=reason, round=upd.round if upd is not None else named[0]
                                 if named is not None else None))
        if upd is not None:
            named = (upd.round, upd.update_id)
        if named is None:
            return []
        status = "late" if reason == "late" else "rejected"
        more = self.mode.refused(client, upd, status, self._now) if upd is not None else []
        ack = Ack(self.job, named[0], self.open.attempt if self.open else self.attempt, client, named[1],
                  status, f"{reason}: {detail}"[:300])
        return [SendAck(client, ack.encode(), status if status == "late" else f"{status}: {reason}", named[0]), *more]

    def _on_message(self, ev: MessageArrived) -> list[Action]:
        self._now = ev.now
        if self.open:
            self.open.bytes_up += len(ev.message)
        env = None
        try:
            env = ev.envelope or wire.decode(ev.message, max_body=self.policy.max_update_bytes)
            if self.verify is not None:
                self.verify(ev.client, env)
            if env.kind == Kind.DECLINE:
                return self._on_decline(ev.client, Decline.parse(env), ev.now)
            if env.kind == Kind.SECAGG:
                return self.mode.on_secagg(ev.client, SecAggStage.parse(env), ev.now)
            if env.kind == Kind.PARTIAL:
                return self.mode.on_region_sum(ev.client, RegionSum.parse(env), ev.now)
            upd = Update.parse(env)
        except IdentityError as exc:
            # No receipt: the device whose id it carries did not send it, and
            # a "rejected" for an update id it did send would stop it.
            return self._reject(exc.reason, str(exc), ev.client, None)
        except (WireError, ProtocolError) as exc:
            return self._reject(exc.reason, str(exc), ev.client, None, _named_in(env))
        return self._on_update(ev.client, upd, ev.now)

    def _on_update(self, client: str, upd: Update, now: float) -> list[Action]:
        """An update: admitted (``aggregator.admission``), then folded into
        the round or taken as a masked input, and acknowledged."""
        verdict = admission.admit(self, client, upd, self.mode.checks)
        if verdict is not None:
            return self._judged(client, upd, verdict)
        op = self.open
        assert op is not None  # admission refuses an update when no round is open
        refused: str | None = None
        if self.secure is not None:
            refused = self.secure.on_input(client, upd.body)
            detail = "the masked input was refused by secure aggregation"
        else:
            try:
                self.updates.admit(client, upd.body, upd.num_samples, upd.clip_bit, self.mode.weight(upd))
            except (CodecError, TensorError) as exc:
                refused, detail = exc.reason, str(exc)
        if refused is not None:
            return self._reject(refused, detail, client, upd)
        op.accepted[client] = upd.update_id
        op.num_samples += upd.num_samples
        if math.isfinite(upd.loss):
            op.losses[client] = (upd.loss, upd.num_samples)
        self.counters["accepted"] += 1
        # The receipt names the round the update names (a buffered job's: the version it trained from).
        ack = Ack(self.job, upd.round, op.attempt, client, upd.update_id, "accepted")
        more = self.mode.accepted(client, upd, now)
        return [SendAck(client, ack.encode(), "accepted", op.round), *more]

    def _judged(self, client: str, upd: Update, verdict: admission.Verdict) -> list[Action]:
        """What follows from an admission check's verdict."""
        if isinstance(verdict, admission.Drop):
            self.counters[verdict.counter] += 1
            log.info("dropped %s's %s", client, verdict.detail,
                     extra=fields(device=client, round=upd.round, reason=verdict.counter))
            return []
        if verdict.alive:
            self.roster.alive(client)
        if isinstance(verdict, admission.Duplicate):
            self.counters["duplicate"] += 1
            ack = Ack(self.job, verdict.round, verdict.attempt, client, upd.update_id, "duplicate", verdict.detail)
            return [SendAck(client, ack.encode(), "duplicate", verdict.round)]
        return self._reject(verdict.reason, verdict.detail, client, upd if verdict.receipt else None)

    def _on_decline(self, client: str, dec: Decline, now: float) -> list[Action]:
        op = self.open
        if dec.sender != client or dec.job != self.job:
            return self._reject("sender_mismatch", "decline for another client or job", client, None)
        if op is None or not self.mode.takes_decline(client, dec):
            self.counters["stray_decline"] += 1
            return []
        self.counters["declined"] += 1
        actions: list[Action] = self.mode.declined(client, now)
        if dec.code == MODEL_UNAVAILABLE:
            # The broker lost, withheld or replaced a retained key or delta:
            # publish both again (once an attempt) for the devices still
            # fetching, and for the next round.
            op.model_missing += 1
            self.counters[MODEL_UNAVAILABLE] += 1
            log.warning("%s declined round %d: it cannot build the announced model (%s)%s", client, dec.round,
                        dec.reason[len(MODEL_UNAVAILABLE) + 1:].strip(),
                        "" if op.republished else "; publishing the key and delta again",
                        extra=fields(device=client, round=dec.round, reason=MODEL_UNAVAILABLE))
            if not op.republished:
                op.republished = True
                actions += self.model_messages()
        else:
            log.info("%s declined round %d: %s", client, dec.round, dec.reason,
                     extra=fields(device=client, round=dec.round, reason="declined"))
        self.mode.check_quorum(now)
        return actions

    def model_messages(self) -> list[Action]:
        """Publish the current key and delta again (counted)."""
        self.counters["model_republished"] += 1
        return [PublishModel(self.models.key_message), PublishDelta(self.models.delta_message)]

    def republish(self, now: float) -> list[Action]:
        """Everything the job keeps retained on the broker, as it is now: the
        key, the delta and the current announcement (for a broker that lost
        its retained messages, e.g. restarted without persistence)."""
        if self.state == RoundState.OPEN and self.open is not None:
            announcement = self.announcement(RoundState.OPEN, self.open.selected, now)
            invites = self.mode.reinvite()
        else:
            announcement, invites = self.announcement(self.state, (), now), []
        return [*self.model_messages(), PublishAnnouncement(announcement), *invites]

    # --- round lifecycle -------------------------------------------------------

    def announcement(self, state: RoundState, selected: tuple[str, ...], now: float) -> bytes:
        fields: dict[str, Any] = {}
        if state == RoundState.OPEN:
            for stage in self.stages:
                fields.update(stage.announced())
        # A round of thousands is not listed: every device downloads this (see invitations).
        inline = selected if len(selected) <= self.policy.list_max else ()
        return RoundAnnouncement(
            job=self.job, round=self.next_round, attempt=self.attempt, state=state.value,
            model_digest=self.model_digest, selected=inline, selected_count=len(selected),
            deadline_s=self.policy.deadline_s,
            training=self.plan, codec=self.codec_params, issued_at=round(now, 3),
            key_digest=self.mode.model_key()[0], key_round=self.mode.model_key()[1],
            dp=fields.get("dp"),
            secagg=self._secure_plan() if state == RoundState.OPEN else None,
            **self.mode.announcement_fields(),
        ).encode()

    def invitations(self, clients: Iterable[str]) -> list[Action]:
        """For a round too large for its announcement to list whom it
        selected: an ``Invite`` to each of ``clients``, on its receipt topic
        (none for a listed round)."""
        op = self.open
        if op is None or len(op.selected) <= self.policy.list_max:
            return []
        return [SendAck(c, Invite(self.job, op.round, op.attempt, c, self.model_digest).encode()) for c in clients]

    def unanswered(self) -> list[str]:
        """Devices of the open round that have sent nothing it counts."""
        op = self.open
        if op is None:
            return []
        return [c for c in op.selected if c not in op.accepted and c not in op.declined and c not in op.refused]

    def _secure_plan(self) -> SecAggPlan | None:
        return None if self.secure is None else self.secure.plan

    @property
    def published_bytes(self) -> int:
        """Bytes of the model messages a device needs for this round's model:
        the delta, plus the key for a device that lacks it."""
        return len(self.models.key_message) + len(self.models.delta_message or b"")

    # --- persistence -----------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, model_meta = self.models.snapshot()
        for slot, named in self.optimizer.state().items():
            arrays.update({f"opt/{slot}/{k}": v for k, v in named.items()})
        meta = {
            "format": 2,
            "job": self.job,
            "next_round": self.next_round,
            **model_meta,
            **self.roster.state(),
            **({} if self.private is not None else NO_PRIVACY_STATE),
            "counters": dict(self.counters),
            "rejections": dict(self.rejections),
            "failures": dict(self.failures),
            "history": [r.to_json() for r in self.history],
            "checkpoint_id": self.new_id(),
        }
        for stage in self.stages:
            stage_arrays, stage_meta = stage.state()
            arrays.update(stage_arrays)
            meta.update(stage_meta)
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], open_round: dict[str, Any] | None) -> None:
        """Load a checkpoint written by ``snapshot`` (and the last round-open
        record); call before ``start``."""
        if meta.get("job") != self.job:
            raise ValueError(f"checkpoint belongs to job {meta.get('job')!r}, not {self.job!r}")
        if meta.get("format") != 2:
            raise ValueError(f"checkpoint format {meta.get('format')} is not supported by this build")
        self.models.restore(arrays, meta)
        slots: dict[str, ModelArrays] = {}
        for k, v in arrays.items():
            if k.startswith("opt/"):
                _, slot, name = k.split("/", 2)
                slots.setdefault(slot, {})[name] = v
        self.optimizer.load_state(slots)
        self.next_round = int(meta["next_round"])
        self.roster.load_state(meta)
        for stage in self.stages:
            stage.load_state(arrays, meta)
        self.counters = Counter(meta.get("counters", {}))
        self.rejections = Counter(meta.get("rejections", {}))
        self.failures = Counter(meta.get("failures", {}))
        self.history = [RoundRecord.from_json(r) for r in meta.get("history", [])]
        self.resume_round(open_round)

    def resume_round(self, open_round: dict[str, Any] | None) -> None:
        """The last round-open record, so that ``start`` re-opens that round to
        the same clients with the next attempt. Also without a checkpoint: a
        crash during round 1 must not re-use attempt 1, whose receipts the
        devices already hold."""
        self._restored_open = open_round
