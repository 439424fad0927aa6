"""The round core under any interleaving of presence, ticks, updates,
duplicates, replays of old messages and crashes (hypothesis state machine).

Whatever happens, the core must: fold each update at most once per attempt;
close every round it opens by its deadline; never lose a checkpointed round
nor close one twice; keep its records consistent; keep the model finite."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aggregator.rounds import (
    ClientStatus,
    MessageArrived,
    RoundFinished,
    SaveCheckpoint,
    SaveRoundOpen,
    SendAck,
    TimerFired,
)
from fedge import wire
from fedge.messages import Ack

from .test_rounds import delta_for, make_core, update

CLIENTS = ("a", "b", "c", "d")
POLICY = {"rounds": 4, "min_clients": 2, "deadline_s": 10.0, "quorum": 1.0}


class RoundMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.online: set[str] = set()
        self.checkpoint: tuple[dict, dict] | None = None
        self.open_record: dict | None = None
        self.sent: list[tuple[str, bytes]] = []
        self.folded: dict[tuple[int, int, str], int] = {}
        self.closed: list[int] = []
        self.core = make_core(**POLICY)
        self.run(self.core.start(self.now))

    def run(self, actions) -> None:
        for action in actions:
            if isinstance(action, SaveCheckpoint):
                self.checkpoint = (action.arrays, action.meta)
            elif isinstance(action, SaveRoundOpen):
                self.open_record = action.record
            elif isinstance(action, SendAck):
                ack = Ack.parse(wire.decode(action.message))
                if ack.status == "accepted":
                    key = (ack.round, ack.attempt, ack.client)
                    self.folded[key] = self.folded.get(key, 0) + 1
            elif isinstance(action, RoundFinished):
                record = action.record
                assert record["clients"] == len(record["accepted"]) <= record["selected"]
                assert record["status"] == ("ok" if record["clients"] >= 1 and record.failure is None else "failed")
                self.closed.append(record["round"])

    def deliver(self, client: str, message: bytes) -> None:
        self.run(self.core.handle(MessageArrived(client, message, self.now)))
        self.run(self.core.handle(TimerFired(self.now)))

    @rule(client=st.sampled_from(CLIENTS), online=st.booleans())
    def presence(self, client: str, online: bool) -> None:
        (self.online.add if online else self.online.discard)(client)
        self.run(self.core.handle(ClientStatus(client, online, {}, self.now)))

    @rule(dt=st.floats(0.1, 12.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.run(self.core.handle(TimerFired(self.now)))

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

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """A QoS 1 duplicate, a resend, or an old message arriving late."""
        if self.sent:
            self.deliver(*data.draw(st.sampled_from(self.sent)))

    @rule(client=st.sampled_from(CLIENTS), junk=st.binary(max_size=80))
    def garbage(self, client: str, junk: bytes) -> None:
        self.deliver(client, junk)

    @rule()
    def crash_and_restart(self) -> None:
        core = make_core(**POLICY)
        if self.checkpoint is not None:
            core.restore(*self.checkpoint, self.open_record)
        else:  # a crash before the first checkpoint: the service hands over the round-open record alone
            core.resume_round(self.open_record)
        self.core = core
        self.run(core.start(self.now))
        for client in sorted(self.online):  # the broker hands the restarted shell the retained presence
            self.run(core.handle(ClientStatus(client, True, {}, self.now)))

    @invariant()
    def each_update_is_folded_at_most_once_per_attempt(self) -> None:
        assert all(n == 1 for n in self.folded.values()), self.folded

    @invariant()
    def no_round_is_closed_twice_or_skipped(self) -> None:
        assert self.closed == list(range(1, len(self.closed) + 1))
        assert self.core.next_round <= POLICY["rounds"] + 1

    @invariant()
    def an_open_round_closes_by_its_deadline(self) -> None:
        op = self.core.open
        assert op is None or self.now < op.deadline

    @invariant()
    def the_model_stays_finite(self) -> None:
        assert all(np.all(np.isfinite(v)) for v in self.core.models.exact.values())


RoundMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_round_core_state_machine = RoundMachine.TestCase
