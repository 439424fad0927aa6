"""The round core under any interleaving of presence, ticks, updates,
declines, duplicates, replays of old messages and crashes (hypothesis state
machine), for each kind of round it runs: plain, with a dense robust rule
(median, krum), private (central or distributed noise), and securely
aggregated (the devices speak the protocol with
``edge_agent.secure.SecureSession``; which device answers which stage, and
when, is hypothesis's choice, so devices drop out at any stage).

Whatever happens, the core must: fold each update at most once per attempt,
and answer another copy of a counted update with "duplicate"; name in a
receipt the update it folded; re-open a round after a restart as a new
attempt; close every round it opens by its deadline (a secure round's
unmasking by its own); never lose a checkpointed round nor close one twice;
keep its records consistent; keep the model finite. And per kind: a private
round's release carries noise and its record says what the job has spent,
which never goes down nor over the budget; a secure round succeeds only
when unmasking did, on exactly the inputs it folded, and moves the model by
their mean.

``pytest --hypothesis-show-statistics`` shows how the examples' rounds
ended (``event``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aggregator.lifecycle import Phase
from aggregator.privacy import DpPolicy, PrivacySpec, epsilon
from aggregator.robust import Defences
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
from aggregator.secure import SecAggPolicy
from edge_agent.secure import SecureSession
from fedge import wire
from fedge.messages import Ack, Decline, ProtocolError, RoundAnnouncement, SecAggStage, Update
from fedge.secagg import flatten, pack
from fedge.wire import Kind

from .builders import INITIAL, JOB, delta_for, make_core, update

CLIENTS = ("a", "b", "c", "d")
POLICY = {"rounds": 4, "min_clients": 2, "deadline_s": 10.0, "quorum": 1.0}
DP_SPEC = PrivacySpec(1.0, sampling_rate=1.0, delta=1e-5)
BUDGET = epsilon(DP_SPEC, 3)  # dp_central: the budget stops the job after three private rounds of four
SECAGG = SecAggPolicy(bound=0.5, stage_s=5.0)
TICK_S = 5.0  # the secagg machine's longest tick: none skips a whole stage


@dataclass(frozen=True)
class Variant:
    policy: dict[str, Any] = field(default_factory=dict)  # over POLICY
    examples: int = 200
    steps: int = 50
    private: bool = False
    secure: bool = False


VARIANTS = {
    "default": Variant(),
    "median": Variant({"defences": Defences(rule="median")}),
    "krum": Variant({"defences": Defences(rule="krum", krum_f=1)}),
    "dp_central": Variant({"privacy": DpPolicy(DP_SPEC, clip=0.5, target_epsilon=BUDGET, min_devices=2),
                           "defences": Defences(direction="off")}, private=True),
    "dp_distributed": Variant({"privacy": DpPolicy(DP_SPEC, clip=0.5, noise="distributed", min_devices=2),
                               "defences": Defences(direction="off")}, private=True),
    # Three devices at least (SecAggPolicy.plan): three selected of a..d need two survivors, four need three.
    # A longer round (three stages of SECAGG.stage_s fit in it) and more steps: each device has a few
    # exchanges to make.
    "secagg": Variant({"min_clients": 3, "deadline_s": 15.0, "secagg": SECAGG}, examples=150, steps=150,
                      secure=True),
}


def sometimes(n: int) -> st.SearchStrategy[bool]:
    """True once in ``n`` draws (hypothesis weighs rules alike)."""
    return st.sampled_from([False] * (n - 1) + [True])


def receipts(actions) -> list[Ack]:
    """The update receipts among ``actions`` (not secure aggregation's stage messages)."""
    envelopes = [wire.decode(a.message) for a in actions if isinstance(a, SendAck)]
    return [Ack.parse(env) for env in envelopes if env.kind == Kind.ACK]


class RoundMachine(RuleBasedStateMachine):
    """The rules and invariants every kind of round shares; ``VARIANT`` says
    which kind (``machine`` makes one class per kind)."""

    VARIANT = Variant()

    def __init__(self) -> None:
        super().__init__()
        self.policy = {**POLICY, **self.VARIANT.policy}
        self.now = 0.0
        self.online: set[str] = set()
        self.checkpoint: tuple[dict, dict] | None = None
        self.open_record: dict | None = None
        self.sent: list[tuple[str, bytes]] = []
        self.folded: dict[tuple[int, int, str], int] = {}
        self.closed: list[int] = []
        self.records: dict[int, Any] = {}  # round -> the record it closed with
        self.spent = 0.0  # epsilon of the last private round closed
        self.model = {k: v.copy() for k, v in INITIAL.items()}  # after the last round closed
        self.ann: RoundAnnouncement | None = None  # the last announcement published
        self.core = make_core(**self.policy)
        self.run(self.core.start(self.now))

    def run(self, actions) -> None:
        for action in actions:
            if isinstance(action, SaveCheckpoint):
                self.checkpoint = (action.arrays, action.meta)
            elif isinstance(action, SaveRoundOpen):
                self.open_record = action.record
            elif isinstance(action, PublishAnnouncement):
                self.ann = RoundAnnouncement.parse(wire.decode(action.message))
            elif isinstance(action, SendAck):
                env = wire.decode(action.message)
                if env.kind == Kind.SECAGG:
                    self.on_stage(action.client, SecAggStage.parse(env))
                    continue
                ack = Ack.parse(env)
                assert ack.client == action.client, (ack, action)
                if ack.status == "accepted":
                    key = (ack.round, ack.attempt, ack.client)
                    self.folded[key] = self.folded.get(key, 0) + 1
            elif isinstance(action, RoundFinished):
                self.on_finished(action.record, action.model)
                self.model = {k: v.copy() for k, v in action.model.items()}
                self.closed.append(action.record["round"])
                self.records[action.record["round"]] = action.record

    def on_finished(self, record, model) -> None:
        # What the examples exercised: pytest --hypothesis-show-statistics counts these.
        event(f"a round closed: {record.failure or 'ok'} (by {record['closed_by']})")
        assert record["clients"] == len(record["accepted"]) <= record["selected"]
        assert record["clients"] + record["declined"] <= record["selected"], record  # each device answers once
        assert record["status"] == ("ok" if record.failure is None else "failed"), record
        if not self.VARIANT.private:
            assert record["status"] == ("ok" if record["clients"] >= 1 and record.failure is None else "failed")
        else:
            # A private round releases a model whatever arrived (noise alone, if nothing did), and
            # says what the job has spent.
            spent = record.extra["epsilon"]
            assert self.spent <= spent, (self.spent, record.extra)
            target = self.policy["privacy"].target_epsilon
            assert not target or spent <= target + 1e-4, record.extra  # (rounded to 4 places)
            self.spent = spent
            if record["status"] == "ok":  # released: with noise, and counted
                assert spent > 0 and record.extra["dp_rounds"] >= 1 and "dp_noise_added" in record.extra, record
                assert record.extra["dp_noise"] == "distributed" or record.extra["dp_noise_added"] > 0, record

    def on_stage(self, client: str, msg: SecAggStage) -> None:
        raise AssertionError(f"a secagg {msg.stage} message to {client} in a round without secure aggregation")

    def deliver(self, client: str, message: bytes) -> None:
        try:
            upd: Update | None = Update.parse(wire.decode(message))
        except (wire.WireError, ProtocolError):
            upd = None
        # Another update from a device whose update its round counted (this attempt, or the round's
        # last if it closed): a duplicate, never folded nor refused (a refusal would make the device
        # take back an update that was counted).
        counted = False
        if upd is not None and upd.sender == client and upd.job == JOB:
            op = self.core.open
            if op is not None and upd.round == op.round:
                counted = client in op.accepted
            elif op is None or upd.round < op.round:
                counted = upd.round in self.records and client in self.records[upd.round]["accepted"]
        actions = self.core.handle(MessageArrived(client, message, self.now))
        statuses = [ack.status for ack in receipts(actions)]
        assert not counted or statuses == ["duplicate"], (statuses, upd)
        for ack in receipts(actions):
            if ack.status == "accepted":
                # A receipt names the update it folded: its round and id (and a masked input's attempt).
                assert upd is not None and (ack.round, ack.update_id) == (upd.round, upd.update_id), (ack, upd)
                assert self.core.secure is None or ack.attempt == upd.attempt, (ack, upd)
        self.run(actions)
        self.run(self.core.handle(TimerFired(self.now)))

    @initialize(clients=st.sets(st.sampled_from(CLIENTS)))
    def the_broker_hands_over_retained_presence(self, clients: set[str]) -> None:
        """Devices already online when the aggregator starts (none, some or all)."""
        for client in sorted(clients):
            self.presence(client, True)

    @rule(client=st.sampled_from(CLIENTS), online=st.booleans())
    def presence(self, client: str, online: bool) -> None:
        (self.online.add if online else self.online.discard)(client)
        self.run(self.core.handle(ClientStatus(client, online, {}, self.now)))

    @rule(dt=st.floats(0.1, 12.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.run(self.core.handle(TimerFired(self.now)))

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """A QoS 1 duplicate, a resend, or an old message arriving late."""
        if self.sent:
            self.deliver(*data.draw(st.sampled_from(self.sent)))

    @rule(client=st.sampled_from(CLIENTS), junk=st.binary(max_size=80))
    def garbage(self, client: str, junk: bytes) -> None:
        self.deliver(client, junk)

    @rule(client=st.sampled_from(CLIENTS), lacks_model=st.booleans())
    def decline(self, client: str, lacks_model: bool) -> None:
        """The device cannot take part: its training failed, or it cannot
        build the announced model (the broker lost it)."""
        op = self.core.open
        round_ = op.round if op else self.core.next_round
        reason = "model_unavailable: no delta from key round 0" if lacks_model else "training failed: out of memory"
        message = Decline(JOB, round_, client, reason).encode()
        self.sent.append((client, message))
        self.deliver(client, message)

    @rule()
    def crash_and_restart(self) -> None:
        op = self.core.open
        was = (op.round, op.attempt) if op is not None else None
        core = make_core(**self.policy)
        if self.checkpoint is not None:
            core.restore(*self.checkpoint, self.open_record)
        else:  # a crash before the first checkpoint: the service hands over the round-open record alone
            core.resume_round(self.open_record)
        self.core = core
        self.run(core.start(self.now))
        if was is not None and core.open is not None and core.open.round == was[0]:
            # The same round again: a new attempt, whose receipts and secure aggregation's keys are new.
            assert core.open.attempt > was[1], (was, core.open)
        for client in sorted(self.online):  # the broker hands the restarted shell the retained presence
            self.run(core.handle(ClientStatus(client, True, {}, self.now)))

    @invariant()
    def each_update_is_folded_at_most_once_per_attempt(self) -> None:
        assert all(n == 1 for n in self.folded.values()), self.folded

    @invariant()
    def no_round_is_closed_twice_or_skipped(self) -> None:
        assert self.closed == list(range(1, len(self.closed) + 1))
        assert self.core.next_round <= self.policy["rounds"] + 1

    @invariant()
    def an_open_round_closes_by_its_deadline(self) -> None:
        op, sec, life = self.core.open, self.core.secure, self.core.life
        if op is None:
            assert life.phase in (Phase.WAITING, Phase.SETTLING, Phase.DONE), life
            return
        if life.phase is Phase.OPEN:
            assert self.now < life.deadline
        else:  # a secure round that stopped taking inputs: unmasking has its own deadline
            assert life.phase is Phase.UNMASKING, life
            assert sec is not None and sec.stage == "unmask" and self.now < sec.deadline, (op, sec)
        if sec is not None and sec.stage in ("keys", "shares", "unmask"):
            assert self.now < sec.deadline, sec.stage

    @invariant()
    def each_selected_device_answers_once(self) -> None:
        """A device that declined, or sent an update that was refused, and
        then sent one that was accepted counts once towards the quorum."""
        op = self.core.open
        if op is not None:
            answered = self.core.mode.answered_without_update(op)
            assert answered <= set(op.selected) and not answered & set(op.accepted), (answered, op)

    @invariant()
    def the_model_stays_finite(self) -> None:
        assert all(np.all(np.isfinite(v)) for v in self.core.models.exact.values())


class PlainMachine(RoundMachine):
    """Devices that send a float32 update, honest or not, whenever they like."""

    @rule(client=st.sampled_from(CLIENTS))
    def train_and_send(self, client: str) -> None:
        op = self.core.open
        round_ = op.round if op else self.core.next_round
        message = update(self.core, client, round=round_, update_id=f"{client}-{round_}")
        self.sent.append((client, message))
        self.deliver(client, message)

    @rule(client=st.sampled_from(CLIENTS), scale=st.sampled_from([-1.0, 100.0, 1e20, 3e38]),
          samples=st.sampled_from([1, 10**6]))
    def hostile_update(self, client: str, scale: float, samples: int) -> None:
        """A device's own update, scaled or sign-flipped, claiming any weight."""
        op = self.core.open
        round_ = op.round if op else self.core.next_round
        with np.errstate(over="ignore"):  # 3e38 x a normal draw: Inf, which the core must refuse
            delta = {k: (v * np.float32(scale)).astype(np.float32) for k, v in delta_for(client).items()}
        message = update(self.core, client, round=round_, update_id=f"{client}-{round_}-x", delta=delta,
                         samples=samples)
        self.sent.append((client, message))
        self.deliver(client, message)


class SecureMachine(RoundMachine):
    """Devices that take part in secure aggregation as an agent does
    (``edge_agent.core``: ``_secure_begin``, ``_secure_done``,
    ``_secure_send``): fresh keys when an announcement selects them, an
    answer to each stage message, the masked input once both the trained
    update and the routed shares are in hand. Each may drop out at any
    stage, and come back for the next attempt."""

    def __init__(self) -> None:
        self.sessions: dict[str, SecureSession] = {}
        self.inbox: dict[str, list[SecAggStage]] = {c: [] for c in CLIENTS}
        self.quit: set[tuple[int, int, str]] = set()  # (round, attempt, device): dropped out of that attempt
        self.inputs: dict[tuple[int, int, str], np.ndarray] = {}  # what each device added, clamped
        self.forged: set[tuple[int, int]] = set()  # attempts that folded a forged masked input
        self.masked: dict[tuple[int, int, str], bytes] = {}  # (round, attempt, device) -> its masked input
        super().__init__()

    # Some rules take effect once in n draws (``now``), so that a secure round's exchanges outweigh
    # them: each device has a few to make, a restart starts a new attempt from the keys, a decline
    # before the keys are shared ends the attempt, and time passes also while the devices respond.
    @rule(dt=st.floats(0.1, TICK_S), now=sometimes(3))
    def tick(self, dt: float, now: bool = True) -> None:
        """Time passes (also while the devices respond): a stage lasts
        secagg.stage_s, the round its deadline."""
        if now:
            super().tick(dt)

    @rule(client=st.sampled_from(CLIENTS), online=st.sampled_from([True, True, False]))
    def presence(self, client: str, online: bool) -> None:
        """Online twice as often as offline: a secure round needs three devices of four."""
        super().presence(client, online)

    @rule(now=sometimes(6))
    def crash_and_restart(self, now: bool) -> None:
        if now:
            super().crash_and_restart()

    @precondition(lambda self: self.core.secure is not None and self.core.secure.stage in ("inputs", "unmask"))
    @rule(now=sometimes(3))
    def crash_with_inputs_in_hand(self, now: bool) -> None:
        """The aggregator dies with masked inputs in hand: the devices that
        sent one hold an input for an attempt that is gone."""
        if now:
            super().crash_and_restart()

    @rule(clients=st.lists(st.sampled_from(CLIENTS), unique=True, min_size=1), lacks_model=st.booleans(),
          now=sometimes(4))
    def decline(self, clients: list[str], lacks_model: bool, now: bool) -> None:
        """One device or several (e.g. the broker lost the model they all need)."""
        if now:
            for c in clients:
                super().decline(c, lacks_model)

    def on_stage(self, client: str, msg: SecAggStage) -> None:
        ann = self.ann
        assert ann is not None and msg.client == client and client in ann.selected, (client, msg, ann)
        assert (msg.job, msg.round, msg.attempt) == (ann.job, ann.round, ann.attempt), (msg, ann)
        self.inbox[client].append(msg)

    def on_finished(self, record, model) -> None:
        super().on_finished(record, model)
        summary = record.extra["secagg"]
        event(f"secure aggregation ended: {summary['stage']} {summary.get('failure', '')[:30]}")
        # Secure aggregation is the only way to a model: no sum, no round.
        assert record["status"] != "ok" or summary["stage"] == "done", record
        if "inputs" in summary:
            assert summary["inputs"] == record["clients"], record
        key = (record["round"], record["attempt"])
        if record["status"] == "ok" and key not in self.forged:
            # The masks cancel: the model moved by the mean of what the devices added (made integers).
            added = np.mean([self.inputs[(*key, c)] for c in record["accepted"]], axis=0)
            moved = flatten(model, self.core.spec.names) - flatten(self.model, self.core.spec.names)
            scale = (2 ** (SECAGG.bits - 1) - 1) / SECAGG.bound
            np.testing.assert_allclose(moved, added, rtol=0, atol=2 / scale + 1e-5)

    def session(self, client: str) -> SecureSession | None:
        """The device's session for the open attempt, if it joined it."""
        s, ann = self.sessions.get(client), self.ann
        if s is None or ann is None or ann.state != "open" or (s.round, s.attempt) != (ann.round, ann.attempt):
            return None
        return s

    def send(self, client: str, message: bytes) -> None:
        self.sent.append((client, message))
        self.deliver(client, message)

    def join(self, client: str) -> bool:
        ann = self.ann
        if (ann is None or ann.state != "open" or ann.secagg is None or client not in ann.selected
                or self.session(client) is not None or (ann.round, ann.attempt, client) in self.quit):
            return False
        s = self.sessions[client] = SecureSession(client, ann.job, ann.round, ann.attempt, ann.secagg)
        self.inbox[client] = [m for m in self.inbox[client] if (m.round, m.attempt) == (s.round, s.attempt)]
        self.send(client, s.keys().encode())
        return True

    def answer(self, client: str, redelivered: bool = False) -> bool:
        """The device's oldest stage message: answer it (an old attempt's is refused)."""
        if not self.inbox[client]:
            return False
        msg = self.inbox[client].pop(0)
        s = self.session(client)
        if s is None:
            return True  # no session for it (dropped out, or an old attempt's): ignored
        out = s.on_stage(msg)
        if isinstance(out, SecAggStage):
            self.send(client, out.encode())
        self.masked_input(client, redelivered)
        return True

    def train(self, client: str, scale: float = 1.0, redelivered: bool = False) -> bool:
        s = self.session(client)
        if s is None or s.input is not None:
            return False
        flat = flatten(delta_for(client, scale), self.core.spec.names)
        s.set_update(flat, np.random.default_rng(0))
        self.inputs[(s.round, s.attempt, client)] = np.clip(flat, -SECAGG.bound, SECAGG.bound)
        self.masked_input(client, redelivered)
        return True

    def masked_input(self, client: str, redelivered: bool = False) -> None:
        s, ann = self.session(client), self.ann
        body = s.masked_body() if s is not None else None
        if body is None:
            return
        assert ann is not None
        if redelivered:
            for (r, a, c), old in sorted(self.masked.items()):
                if (r, c) == (ann.round, client) and a < ann.attempt:
                    self.deliver(client, old)
        message = Update(job=ann.job, round=ann.round, sender=client, update_id=f"{client}-{ann.round}",
                         num_samples=10, codec=ann.codec, base_model=ann.model_digest, body=body,
                         attempt=ann.attempt).encode()
        self.masked[(ann.round, ann.attempt, client)] = message
        self.send(client, message)

    @rule(order=st.permutations(CLIENTS), silent=st.sets(st.sampled_from(CLIENTS), max_size=3),
          trained=st.booleans(), dt=st.floats(0.0, 2.0), redelivered=st.booleans())
    def devices_respond(self, order: list[str], silent: set[str], trained: bool, dt: float,
                        redelivered: bool) -> None:
        """After ``dt`` seconds, each device in this order but the silent
        ones joins the open attempt (if it has not), answers every stage
        message it holds and, if ``trained``, finishes training.
        ``redelivered``: a device's masked input for an earlier attempt of
        the round, if it sent one, arrives just before its new one (QoS 1
        redelivery after a reconnect)."""
        self.tick(dt)
        for c in (c for c in order if c not in silent):
            self.join(c)
            while self.answer(c, redelivered):
                pass
            if trained:
                self.train(c, redelivered=redelivered)

    @rule(client=st.sampled_from(CLIENTS))
    def device_acts(self, client: str) -> None:
        """One device does its next thing: join, answer a stage, or train."""
        _ = self.join(client) or self.answer(client) or self.train(client)

    @rule(client=st.sampled_from(CLIENTS), scale=st.sampled_from([1.0, -1.0, 100.0]))
    def device_trains(self, client: str, scale: float) -> None:
        """Training runs beside the protocol: it may end before any stage
        (an update too large is clamped to the bound)."""
        self.train(client, scale)

    @rule(data=st.data())
    def stale_input(self, data: st.DataObject) -> None:
        """A masked input made for an earlier attempt of the open round
        arrives after a restart (QoS 1 redelivery, or a slow network)."""
        ann = self.ann
        stale = [(c, m) for (r, a, c), m in self.masked.items()
                 if ann is not None and ann.state == "open" and r == ann.round and a < ann.attempt]
        if stale:
            self.deliver(*data.draw(st.sampled_from(stale)))

    @rule(client=st.sampled_from(CLIENTS))
    def device_drops_out(self, client: str) -> None:
        """The device leaves the attempt at whatever stage it is in, for good."""
        s = self.session(client)
        if s is not None:
            self.quit.add((s.round, s.attempt, client))
            del self.sessions[client]

    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def forged_input(self, client: str, data: st.DataObject) -> None:
        """A masked input of the right size that no protocol made (e.g. a
        device that skipped the masks): the sum it spoils must not become a
        model."""
        ann, sec = self.ann, self.core.secure
        if ann is None or ann.state != "open" or sec is None:
            return
        values = np.array(data.draw(st.lists(st.integers(0, 2 ** sec.plan.modulus_bits - 1),
                                             min_size=sec.count, max_size=sec.count)), dtype=np.uint32)
        before = self.core.counters["accepted"]
        self.send(client, Update(job=ann.job, round=ann.round, sender=client, update_id=f"{client}-forged",
                                 num_samples=10, codec=ann.codec, base_model=ann.model_digest,
                                 body=pack(values, sec.plan.modulus_bits), attempt=ann.attempt).encode())
        if self.core.counters["accepted"] > before:
            self.forged.add((ann.round, ann.attempt))

    @invariant()
    def secure_aggregation_folds_what_the_round_accepted(self) -> None:
        op, sec = self.core.open, self.core.secure
        if op is not None and sec is not None:
            assert set(sec.server.survivors) == set(op.accepted), (sec.server.survivors, op.accepted)


def machine(name: str) -> type[RoundMachine]:
    """The state machine for one kind of round, with its budget."""
    v = VARIANTS[name]
    base = SecureMachine if v.secure else PlainMachine
    cls = type(f"RoundMachine_{name}", (base,), {"VARIANT": v})
    cls.TestCase.settings = settings(max_examples=v.examples, stateful_step_count=v.steps, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                            HealthCheck.data_too_large])
    return cls


test_round_core_state_machine = machine("default").TestCase
test_round_core_state_machine_median = machine("median").TestCase
test_round_core_state_machine_krum = machine("krum").TestCase
test_round_core_state_machine_dp_central = machine("dp_central").TestCase
test_round_core_state_machine_dp_distributed = machine("dp_distributed").TestCase
test_round_core_state_machine_secagg = machine("secagg").TestCase
