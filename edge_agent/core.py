"""The edge agent's protocol core. Everything that decides what a device does
in a round lives here; no sockets, files, clocks or PyTorch.

Theory of operation
-------------------
The shell feeds events (the broker connected, a global model or round
announcement or receipt arrived, training finished or failed, a timer
ticked) and carries out the returned actions in order.

* A device trains for round r only when the retained announcement for r is
  ``open``, lists it as selected, and it holds the global model whose digest
  the announcement names (it waits for the retained model otherwise; a model
  that fails its hash never reaches this core).
* Training runs elsewhere (a worker process); the result becomes an update
  encoded with the codec the announcement names, persisted, then published.
  If the round moved on meanwhile, the result is dropped, not sent late.
* The persisted update is resent with backoff until the aggregator's receipt
  (``accepted`` or ``duplicate``) for the current attempt arrives, and again
  if the aggregator re-announces the same round with a higher ``attempt``
  (it restarted and lost its in-memory sum). The same bytes go out every
  time, so the aggregator counts the update once.
* ``last_round`` only grows and is persisted with the pending update before
  anything is published: a device restarted at any moment never trains
  twice for one round, and never sends two different updates for it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedge import wire
from fedge.codecs import CodecError, make_codec
from fedge.messages import Ack, Decline, GlobalModel, ProtocolError, RoundAnnouncement, Status, TrainingPlan, Update
from fedge.tensors import ModelArrays
from fedge.wire import WireError

log = logging.getLogger("fedge.agent")

BUILTIN_MODELS = "fedge.models:"
MAX_RESEND_S = 300.0

# --- events ----------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    now: float


@dataclass(frozen=True)
class ModelArrived:
    message: bytes
    now: float


@dataclass(frozen=True)
class AnnouncementArrived:
    message: bytes
    now: float


@dataclass(frozen=True)
class AckArrived:
    message: bytes
    now: float


@dataclass(frozen=True)
class TrainingDone:
    job_id: str
    delta: ModelArrays
    num_samples: int
    loss: float
    seconds: float
    now: float


@dataclass(frozen=True)
class TrainingFailed:
    job_id: str
    reason: str
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


Event = Connected | ModelArrived | AnnouncementArrived | AckArrived | TrainingDone | TrainingFailed | Tick

# --- actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class PublishStatus:
    message: bytes  # retained on the client's status topic


@dataclass(frozen=True)
class PublishUpdate:
    message: bytes  # chunked on the client's update topic (updates and declines)


@dataclass(frozen=True)
class TrainJob:
    job_id: str
    round: int
    base_model: str
    model: str
    model_args: dict[str, Any]
    model_body: bytes
    plan: TrainingPlan
    seed: int


@dataclass(frozen=True)
class StartTraining:
    job: TrainJob


@dataclass(frozen=True)
class PersistState:
    state: dict[str, Any]
    update: bytes | None  # the pending update's bytes, or None to delete them


Action = PublishStatus | PublishUpdate | StartTraining | PersistState

# --- state -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    round: int
    update_id: str
    base_model: str
    sent_attempt: int = 0  # the announcement attempt we last sent it for
    acked_attempt: int = 0  # 0: no receipt yet
    final: bool = False  # a receipt said late/rejected: never resend


@dataclass
class AgentState:
    """What survives a restart."""

    last_round: int = 0
    pending: Pending | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "last_round": self.last_round,
                "pending": None if self.pending is None else dict(self.pending.__dict__)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AgentState:
        pending = obj.get("pending")
        return cls(last_round=int(obj.get("last_round", 0)), pending=Pending(**pending) if pending else None)


@dataclass
class _Training:
    job_id: str
    round: int
    base_model: str


@dataclass
class _Resend:
    at: float
    interval: float


@dataclass
class AgentCore:
    client_id: str
    job: str
    info: dict[str, Any]
    accepted_model: str = ""  # factory this device accepts; "" = built-ins only
    resend_after_s: float = 20.0
    state: AgentState = field(default_factory=AgentState)
    update_bytes: bytes | None = None  # bytes of state.pending, restored by the shell

    model: GlobalModel | None = None
    model_digest: str = ""
    announcement: RoundAnnouncement | None = None
    training: _Training | None = None
    resend: _Resend | None = None
    counters: dict[str, int] = field(default_factory=dict)

    # --- entry points ----------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Connected):
            return [PublishStatus(self.status("online"))]
        if isinstance(event, ModelArrived):
            return self._on_model(event)
        if isinstance(event, AnnouncementArrived):
            return self._on_announcement(event)
        if isinstance(event, AckArrived):
            return self._on_ack(event)
        if isinstance(event, TrainingDone):
            return self._on_done(event)
        if isinstance(event, TrainingFailed):
            return self._on_failed(event)
        if isinstance(event, Tick):
            return self._on_tick(event.now)
        raise TypeError(f"unknown event {event!r}")

    def status(self, state: str) -> bytes:
        return Status(self.client_id, state, self.info if state == "online" else {}).encode()

    # --- handlers --------------------------------------------------------------

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _on_model(self, ev: ModelArrived) -> list[Action]:
        try:
            env = wire.decode(ev.message)
            model = GlobalModel.parse(env)
        except (WireError, ProtocolError) as exc:
            self._count("bad_model")
            log.warning("%s: ignored a global model: %s", self.client_id, exc)
            return []
        if model.job != self.job:
            self._count("bad_model")
            log.warning("%s: ignored a global model of job %r", self.client_id, model.job)
            return []
        if self.accepted_model:
            allowed = model.model == self.accepted_model
        else:
            allowed = model.model.startswith(BUILTIN_MODELS)
        if not allowed:
            self._count("refused_model")
            log.error("%s: refused global model factory %r: set agent.model to it if this device should run it",
                      self.client_id, model.model)
            return []
        if self.model is not None and model.round < self.model.round:
            return []  # an older retained copy arriving after a newer live one
        self.model, self.model_digest = model, env.digest
        return self._consider(ev.now)

    def _on_announcement(self, ev: AnnouncementArrived) -> list[Action]:
        try:
            ann = RoundAnnouncement.parse(wire.decode(ev.message))
        except (WireError, ProtocolError) as exc:
            self._count("bad_announcement")
            log.warning("%s: ignored a round announcement: %s", self.client_id, exc)
            return []
        if ann.job != self.job:
            return []
        prev = self.announcement
        self.announcement = ann
        if ann.state == "done" and (prev is None or prev.state != "done"):
            log.info("%s: job %s is done", self.client_id, self.job)
        return self._consider(ev.now)

    def _on_ack(self, ev: AckArrived) -> list[Action]:
        try:
            ack = Ack.parse(wire.decode(ev.message))
        except (WireError, ProtocolError) as exc:
            self._count("bad_ack")
            log.warning("%s: ignored a receipt: %s", self.client_id, exc)
            return []
        p = self.state.pending
        if ack.client != self.client_id or p is None or ack.update_id != p.update_id or ack.round != p.round:
            return []
        if ack.status in ("accepted", "duplicate"):
            self.state.pending = replace(p, acked_attempt=max(p.acked_attempt, ack.attempt))
            if not self._needs_sending(self.state.pending):
                self.resend = None
        else:
            self.resend = None
            self._count(f"update_{ack.status}")
            log.error("%s: round %d update was %s: %s", self.client_id, ack.round, ack.status, ack.reason)
            self.state.pending = replace(p, final=True)
        return [PersistState(self.state.to_json(), self.update_bytes)]

    def _on_done(self, ev: TrainingDone) -> list[Action]:
        t = self.training
        if t is None or t.job_id != ev.job_id:
            return []
        self.training = None
        ann = self.announcement
        if not self._open_for_me(ann) or ann is None or ann.round != t.round or ann.model_digest != t.base_model:
            self._count("stale_training")
            log.info("%s: round %d closed before training finished; result dropped", self.client_id, t.round)
            return self._consider(ev.now)
        try:
            codec = make_codec(ann.codec)
            rng = np.random.default_rng(_seed(self.client_id, t.round, "encode"))
            body = codec.encode(ev.delta, rng)
        except (CodecError, ValueError) as exc:
            return self._decline(t.round, f"cannot encode the update: {exc}")
        update = Update(
            job=self.job, round=t.round, sender=self.client_id, update_id=uuid.uuid4().hex[:16],
            num_samples=ev.num_samples, codec=ann.codec, base_model=t.base_model, body=body,
            loss=ev.loss, train_seconds=round(ev.seconds, 4),
        )
        message = update.encode()
        self.state.last_round = max(self.state.last_round, t.round)
        self.state.pending = Pending(t.round, update.update_id, t.base_model, sent_attempt=ann.attempt)
        self.update_bytes = message
        self.resend = _Resend(ev.now + self.resend_after_s, self.resend_after_s)
        self._count("updates_sent")
        return [PersistState(self.state.to_json(), message), PublishUpdate(message)]

    def _on_failed(self, ev: TrainingFailed) -> list[Action]:
        t = self.training
        if t is None or t.job_id != ev.job_id:
            return []
        self.training = None
        self._count("training_failed")
        log.error("%s: training for round %d failed: %s", self.client_id, t.round, ev.reason)
        ann = self.announcement
        if ann is not None and ann.round == t.round and self._open_for_me(ann):
            return self._decline(t.round, ev.reason)
        return self._consider(ev.now)

    def _decline(self, round_: int, reason: str) -> list[Action]:
        self.state.last_round = max(self.state.last_round, round_)
        self.state.pending = None
        self.update_bytes = None
        message = Decline(self.job, round_, self.client_id, reason).encode()
        return [PersistState(self.state.to_json(), None), PublishUpdate(message)]

    def _on_tick(self, now: float) -> list[Action]:
        r = self.resend
        p = self.state.pending
        if r is None or p is None or now < r.at:
            return []
        if not self._needs_sending(p) or self.update_bytes is None:
            self.resend = None
            return []
        interval = min(r.interval * 2, MAX_RESEND_S)
        self.resend = _Resend(now + interval, interval)
        self._count("resent")
        log.info("%s: no receipt for round %d yet; sending the update again", self.client_id, p.round)
        return [PublishUpdate(self.update_bytes)]

    # --- decisions -------------------------------------------------------------

    def _open_for_me(self, ann: RoundAnnouncement | None) -> bool:
        return ann is not None and ann.state == "open" and self.client_id in ann.selected

    def _needs_sending(self, p: Pending | None) -> bool:
        """The pending update belongs to the open round and has no receipt
        for the announcement's current attempt."""
        ann = self.announcement
        return (
            p is not None and self._open_for_me(ann) and ann is not None and ann.round == p.round
            and not p.final and self.update_bytes is not None and p.base_model == ann.model_digest
            and p.acked_attempt < ann.attempt
        )

    def _consider(self, now: float) -> list[Action]:
        ann = self.announcement
        if not self._open_for_me(ann):
            return []
        assert ann is not None
        p = self.state.pending
        if p is not None and p.round == ann.round:
            # Sent before this process started, or the aggregator re-announced
            # the round (it restarted and lost its sum): send the same bytes.
            if self._needs_sending(p) and (self.resend is None or p.sent_attempt < ann.attempt):
                self.state.pending = replace(p, sent_attempt=ann.attempt)
                self.resend = _Resend(now + self.resend_after_s, self.resend_after_s)
                self._count("resent")
                assert self.update_bytes is not None
                return [PersistState(self.state.to_json(), self.update_bytes), PublishUpdate(self.update_bytes)]
            return []
        if ann.round <= self.state.last_round or self.training is not None:
            return []
        if self.model is None or self.model_digest != ann.model_digest:
            return []  # the retained model for this round has not arrived yet
        self.training = _Training(uuid.uuid4().hex, ann.round, self.model_digest)
        job = TrainJob(
            job_id=self.training.job_id, round=ann.round, base_model=self.model_digest,
            model=self.model.model, model_args=self.model.model_args, model_body=self.model.body,
            plan=ann.training, seed=_seed(self.client_id, ann.round, "train"),
        )
        return [StartTraining(job)]


def _seed(client: str, round_: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{client}/{round_}/{purpose}".encode()).digest()[:8], "little")
