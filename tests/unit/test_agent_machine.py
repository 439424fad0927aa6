"""The agent core under any interleaving of model and round messages,
receipts, training outcomes, ticks, replays and restarts (hypothesis state
machine).

Whatever happens, the device must: send at most one update per round and
model (a restart or a resend never produces a second, different one);
persist an update before publishing it; train only from the model the round
names; train only for rounds it was selected for; and, whatever came before
(a forged far round included), train for a round it has not done yet."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from edge_agent.core import (
    AckArrived,
    AgentState,
    AnnouncementArrived,
    Connected,
    KeyArrived,
    PersistKey,
    PersistResidual,
    PersistState,
    PublishUpdate,
    StartTraining,
    Tick,
    TrainingDone,
    TrainingFailed,
)
from fedge import wire
from fedge.messages import Ack, Update
from fedge.wire import Kind

from .builders import DELTA, JOB, KEY, ME, ann_msg, key_msg, make

# Two models, as an aggregator's two sessions (or a failed and a successful
# round) would name; the second key has the higher round.
MODELS = [key_msg(), key_msg({k: v + 1 for k, v in KEY.items()}, round_=1)]
DIGESTS = [digest for _, digest in MODELS]
FORGED = 10**9


class AgentMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.state: dict | None = None
        self.update_bytes: bytes | None = None
        self.key: bytes | None = None
        self.residual = None
        self.delivered: list[object] = []
        self.updates: dict[tuple[int, str], set[bytes]] = {}  # (round, model) -> distinct updates published
        self.selected: set[tuple[int, str]] = set()  # (round, model) announced open for this device
        self.fresh_round = 1000
        self.core = make()
        self.run(self.core.handle(Connected(self.now)))

    def run(self, actions) -> None:
        persisted = False
        for action in actions:
            if isinstance(action, PersistState):
                self.state, self.update_bytes, persisted = action.state, action.update, True
            elif isinstance(action, PersistKey):
                self.key = action.message
            elif isinstance(action, PersistResidual):
                self.residual = action.residual
            elif isinstance(action, StartTraining):
                job = action.job
                assert (job.round, job.base_model) in self.selected, "trains only when selected, from the named model"
            elif isinstance(action, PublishUpdate):
                env = wire.decode(action.message)
                if env.kind == Kind.UPDATE:
                    upd = Update.parse(env)
                    assert persisted or action.message == self.update_bytes, "persisted before it is published"
                    self.updates.setdefault((upd.round, upd.base_model), set()).add(action.message)

    def deliver(self, event_for_now) -> list:
        self.delivered.append(event_for_now)
        actions = self.core.handle(event_for_now(self.now))
        self.run(actions)
        return actions

    @rule(model=st.sampled_from([0, 0, 1]))
    def key_arrives(self, model: int) -> None:
        message = MODELS[model][0]
        self.deliver(lambda now: KeyArrived(message, now))

    @rule(round_=st.sampled_from([1, 2, 3, FORGED]), model=st.sampled_from([0, 0, 1]), attempt=st.integers(1, 2),
          selected=st.sampled_from([True, True, False]),
          state=st.sampled_from(["open", "open", "open", "waiting", "done"]))
    def announcement(self, round_: int, model: int, attempt: int, selected: bool, state: str) -> None:
        digest = DIGESTS[model]
        if selected and state == "open":
            self.selected.add((round_, digest))
        message = ann_msg(digest, round_=round_, attempt=attempt, selected=(ME,) if selected else ("other",),
                          state=state, key_digest=digest)
        self.deliver(lambda now: AnnouncementArrived(message, now))

    @rule(model=st.sampled_from([0, 1]))
    def a_round_not_done_yet_is_trained(self, model: int) -> None:
        """No earlier message (a forged far round, another model, a restart)
        keeps the device from a round it has not done, once it is idle."""
        for _ in range(3):  # a finished job may start the next one (for the announcement it then holds)
            self.training_finishes()
        assert self.core.training is None
        self.fresh_round += 1
        digest = DIGESTS[model]
        self.selected.add((self.fresh_round, digest))
        message = ann_msg(digest, round_=self.fresh_round, key_digest=digest)
        actions = self.deliver(lambda now: AnnouncementArrived(message, now))
        actions += self.deliver(lambda now: KeyArrived(MODELS[model][0], now))  # the retained key, if it asked
        assert any(isinstance(a, StartTraining) and a.job.round == self.fresh_round for a in actions), actions

    @rule()
    def training_finishes(self) -> None:
        job = self.core.training
        if job is not None:
            self.run(self.core.handle(TrainingDone(job.job_id, DELTA, 42, 0.7, 1.0, self.now)))

    @rule()
    def training_fails(self) -> None:
        job = self.core.training
        if job is not None:
            self.run(self.core.handle(TrainingFailed(job.job_id, "out of memory", self.now)))

    @rule(status=st.sampled_from(["accepted", "duplicate", "rejected", "late"]), own=st.booleans())
    def receipt(self, status: str, own: bool) -> None:
        pending = self.core.state.pending
        if pending is None:
            return
        update_id = pending.update_id if own else "someone-else"
        message = Ack(JOB, pending.round, 1, ME, update_id, status).encode()
        self.deliver(lambda now: AckArrived(message, now))

    @rule(dt=st.floats(0.5, 30.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.run(self.core.handle(Tick(self.now)))

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """A retained message again after a reconnect, a QoS 1 duplicate, a late copy."""
        if self.delivered:
            self.run(self.core.handle(data.draw(st.sampled_from(self.delivered))(self.now)))

    @rule()
    def restart(self) -> None:
        state = AgentState.from_json(self.state) if self.state is not None else AgentState()
        self.core = make(state=state, update_bytes=self.update_bytes, residual=self.residual)
        if self.key is not None:
            self.core.restore_key(self.key)
        self.run(self.core.handle(Connected(self.now)))

    @invariant()
    def at_most_one_update_per_round_and_model(self) -> None:
        assert all(len(sent) == 1 for sent in self.updates.values()), {r: len(s) for r, s in self.updates.items()}


AgentMachine.TestCase.settings = settings(max_examples=800, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_agent_core_state_machine = AgentMachine.TestCase
