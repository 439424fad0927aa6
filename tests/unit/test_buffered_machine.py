"""The buffered mode's round core under any interleaving of presence,
ticks, updates trained from any recent version (stale, too stale, from the
future, from a made-up model), declines, copies of old messages, forged
tasks and crashes (a hypothesis state machine).

Whatever happens, the core must: fold each task's update into at most one
published version, and answer a copy of a counted update with "duplicate";
never lose a published version across a crash; publish a version of
exactly ``buffer_size`` updates, none staler than ``max_staleness``; never
keep more than ``concurrency`` tasks holding a place, nor ask a device for
two tasks at once; keep the model finite; and, once its devices come
online and answer, finish the job (nothing stalls it for good)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from aggregator.privacy import DpPolicy, PrivacySpec
from aggregator.rounds import (
    ClientStatus,
    MessageArrived,
    PublishAnnouncement,
    RoundFinished,
    SaveCheckpoint,
    SaveRoundOpen,
    SendAck,
    TimerFired,
)
from aggregator.staleness import BufferedPolicy
from fedge import wire
from fedge.codecs import make_codec
from fedge.messages import Ack, Decline, Invite, RoundAnnouncement, Update
from fedge.wire import Kind

from .builders import JOB, PLAIN, delta_for, make_core

CLIENTS = ("a", "b", "c", "d", "e")
POLICY = BufferedPolicy(concurrency=3, buffer_size=2, max_staleness=2)
VERSIONS = 5
DEADLINE_S = 10.0


DP = DpPolicy(PrivacySpec(1.0, sampling_rate=1.0, delta=1e-5), clip=0.5, min_devices=POLICY.buffer_size)


def core(private: bool = False):
    return make_core(buffered=POLICY, defences=PLAIN, rounds=VERSIONS, deadline_s=DEADLINE_S, min_clients=1,
                     privacy=DP if private else None)


class BufferedMachine(RuleBasedStateMachine):
    PRIVATE = False  # central differential privacy per version (PrivateMachine)

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.online: set[str] = set()
        self.checkpoint = None
        self.open_record = None
        self.ann: RoundAnnouncement | None = None
        self.tasks: dict[str, Invite] = {}  # each device's latest invitation
        self.all_tasks: dict[str, str] = {}  # task id -> the device it was given to
        self.made: dict[tuple[str, str], bytes] = {}  # (device, task) -> the update it made for it
        self.sent: list[tuple[str, bytes]] = []  # every message a device sent, for replays
        self.in_version: dict[str, int] = {}  # update id -> the version its receipt said it went into
        self.published: dict[str, int] = {}  # update id -> the published version it is in
        self.versions: list[int] = []
        self.lost: set[str] = set()  # update ids folded into a buffer a crash lost
        self.spent = 0.0  # epsilon of the last private version
        self.core = core(self.PRIVATE)
        self.run(self.core.start(self.now))

    # --- the harness ------------------------------------------------------------------

    def run(self, actions) -> None:
        for a in actions:
            if isinstance(a, SaveCheckpoint):
                self.checkpoint = (a.arrays, a.meta)
            elif isinstance(a, SaveRoundOpen):
                self.open_record = a.record
            elif isinstance(a, PublishAnnouncement):
                self.ann = RoundAnnouncement.parse(wire.decode(a.message))
            elif isinstance(a, SendAck):
                env = wire.decode(a.message)
                if env.kind == Kind.INVITE:
                    inv = Invite.parse(env)
                    assert inv.client == a.client and inv.task
                    assert self.all_tasks.setdefault(inv.task, inv.client) == inv.client, "a task given twice"
                    self.tasks[inv.client] = inv
            elif isinstance(a, RoundFinished):
                rec = a.record
                assert rec.status == "ok", rec
                assert rec.clients == POLICY.buffer_size, rec
                b = rec.extra["buffered"]
                assert sum(b["staleness"].values()) == rec.clients
                assert all(int(s) <= POLICY.max_staleness for s in b["staleness"]), b
                assert self.versions == [] or rec.round == self.versions[-1] + 1, (self.versions, rec.round)
                self.versions.append(rec.round)
                for uid, version in list(self.in_version.items()):
                    if version == rec.round:
                        # Folded into a published version: never again.
                        assert uid not in self.published, f"update {uid} folded into two published versions"
                        self.published[uid] = version
                        del self.in_version[uid]
                assert all(np.isfinite(v).all() for v in a.model.values())
                if self.PRIVATE:  # noised, counted, and never less spent than before
                    assert rec.extra["dp_noise_added"] > 0 and rec.extra["dp_rounds"] == rec.round
                    assert rec.extra["epsilon"] >= self.spent
                    self.spent = rec.extra["epsilon"]

    def deliver(self, client: str, message: bytes) -> list[Ack]:
        self.sent.append((client, message))
        op = self.core.open
        version = op.round if op is not None else None
        actions = self.core.handle(MessageArrived(client, message, self.now))
        acks = [Ack.parse(wire.decode(a.message)) for a in actions if isinstance(a, SendAck)
                and wire.decode(a.message).kind == Kind.ACK]
        try:
            upd = Update.parse(wire.decode(message))
        except Exception:  # a decline
            upd = None
        for ack in acks:
            if upd is not None and ack.update_id == upd.update_id and ack.status == "accepted":
                assert upd.update_id not in self.published, f"{upd.update_id} is in a published version already"
                assert upd.update_id not in self.in_version, f"{upd.update_id} is in the buffer already"
                assert ack.round == upd.round
                self.in_version[upd.update_id] = version
                if upd.update_id in self.lost:
                    event("an update of a buffer lost in a crash folded again")
                if upd.round < version:
                    event("a stale update folded")
            if ack.status == "duplicate":
                event("a copy of a counted update: duplicate")
            if upd is not None and ack.update_id == upd.update_id and ack.status != "accepted":
                # A copy of a counted update hears "duplicate"; one from a version too old for an update
                # to come from any more may hear "late" (its device no longer sends it: stale).
                published = self.published.get(upd.update_id)
                kept = published is not None and published >= self.core.next_round - POLICY.max_staleness - 1
                if kept or upd.update_id in self.in_version:
                    assert ack.status == "duplicate", (ack, upd)
                elif published is not None:
                    assert ack.status in ("duplicate", "late"), (ack, upd)
        self.run(actions)
        self.run(self.core.handle(TimerFired(self.now)))
        return acks

    def update_for(self, client: str, task: str, version: int, model: str) -> bytes:
        key = (client, task)
        if key not in self.made:  # an honest device trains once per task and sends the same bytes again
            body = make_codec(self.core.codec_params).encode(delta_for(client, 0.1), np.random.default_rng(0))
            self.made[key] = Update(job=JOB, round=version, sender=client, update_id=f"u-{client}-{task}",
                                    num_samples=10, codec=self.core.codec_params, base_model=model, body=body,
                                    task=task).encode()
        return self.made[key]

    # --- rules -------------------------------------------------------------------------

    @initialize(clients=st.sets(st.sampled_from(CLIENTS)))
    def the_broker_hands_over_retained_presence(self, clients: set[str]) -> None:
        """Devices already online when the aggregator starts (none, some or all)."""
        for client in sorted(clients):
            self.presence(client, True)

    @rule(client=st.sampled_from(CLIENTS), up=st.sampled_from([True, True, False]))
    def presence(self, client: str, up: bool) -> None:
        (self.online.add if up else self.online.discard)(client)
        self.run(self.core.handle(ClientStatus(client, up, {}, self.now)))

    @rule(dt=st.sampled_from([0.5, 3.0, DEADLINE_S + 1]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.run(self.core.handle(TimerFired(self.now)))

    @rule(data=st.data(), behind=st.sampled_from([0, 0, 0, 1, 2, 3, -1]),
          wrong_model=st.sampled_from([False] * 9 + [True]))
    def train_and_send(self, data: st.DataObject, behind: int, wrong_model: bool) -> None:
        """A device that was given a task sends its update for it, trained
        from a version ``behind`` the one announced (3: too stale; -1: not
        yet made)."""
        if not self.tasks:
            return
        self.send_for(data.draw(st.sampled_from(sorted(self.tasks))), behind, wrong_model)

    def send_for(self, client: str, behind: int, wrong_model: bool) -> None:
        inv, ann = self.tasks.get(client), self.ann
        if inv is None or ann is None or ann.state != "open":
            return
        version = ann.round - behind
        model = "0" * 64 if wrong_model else (self.core.mode.digest_of(version) or ann.model_digest)
        self.deliver(client, self.update_for(client, inv.task, version, model))

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """A copy of anything sent before (QoS 1 redelivery, an agent's resend)."""
        if self.sent:
            client, message = data.draw(st.sampled_from(self.sent))
            self.deliver(client, message)

    @rule(client=st.sampled_from(CLIENTS))
    def forge(self, client: str) -> None:
        ann = self.ann
        if ann is not None:
            [ack] = self.deliver(client, self.update_for(client, "forged-task", ann.round, ann.model_digest)) or [None]
            assert ack is None or ack.status != "accepted"

    @rule(client=st.sampled_from(CLIENTS))
    def decline(self, client: str) -> None:
        if self.ann is not None:
            self.deliver(client, Decline(JOB, self.ann.round, client, "out of memory").encode())

    @rule(now=st.sampled_from([False] * 4 + [True]))
    def crash(self, now: bool) -> None:
        """The aggregator is killed and restarted from its state directory
        (one draw in five: hypothesis weighs rules alike)."""
        if not now:
            return
        restarted = core(self.PRIVATE)
        if self.checkpoint is not None:
            restarted.restore(*self.checkpoint, self.open_record)
        elif self.open_record is not None:
            restarted.resume_round(self.open_record)
        last = self.versions[-1] if self.versions else 0
        assert restarted.next_round == last + 1, "a published version was lost"
        event(f"a crash after {len(self.versions)} published versions")
        self.core = restarted
        self.lost |= set(self.in_version)
        self.in_version.clear()  # the buffer is lost: its devices send their updates again
        self.now += 1.0
        self.run(self.core.start(self.now))
        for client in sorted(self.online):
            self.run(self.core.handle(ClientStatus(client, True, {}, self.now)))

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def places_are_bounded(self) -> None:
        mode = self.core.mode
        assert mode.active() <= POLICY.concurrency
        assert not set(mode.tasks) & set(mode.in_buffer), "a device asked again while its update is in the buffer"

    def teardown(self) -> None:
        """Liveness: every device online and answering its task, the job
        ends (a few ticks at most between answers)."""
        event(f"versions published before the drain: {len(self.versions)}")
        for client in CLIENTS:
            self.presence(client, True)
        for _ in range(200):
            if self.core.state == "done":
                break
            for client in CLIENTS:
                self.send_for(client, 0, False)
            self.tick(DEADLINE_S + 1)
        assert self.core.state == "done", (self.versions, self.core.mode.tasks, self.core.counters)
        assert self.versions == list(range(1, VERSIONS + 1))


class PrivateMachine(BufferedMachine):
    PRIVATE = True


TestBuffered = BufferedMachine.TestCase
TestBuffered.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])
TestPrivateBuffered = PrivateMachine.TestCase
TestPrivateBuffered.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
