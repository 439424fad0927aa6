"""The edge agent's protocol core. Everything that decides what a device does
in a round lives here; no sockets, files, clocks or PyTorch.

Theory of operation
-------------------
The shell feeds events (the broker connected; a key model, a delta, a round
announcement or a receipt arrived; training finished or failed; a timer
ticked) and carries out the returned actions in order.

The model. The aggregator publishes a key model now and then and, every
round, the current model as a delta from that key (``fedge.downlink``). The
device keeps the latest key it accepted and rebuilds the current model from
the key and the retained delta, then checks the result's state digest
against the announcement: a device never trains on a model that does not
hash to the digest the round names. A delta for a key the device lacks is
held until the key arrives. With ``downlink = "on_demand"`` the device
subscribes to the model topics only while it is selected and lacks the
announced model, so idle devices download nothing; with ``"follow"`` it
keeps up with every model.

The round. A device trains for round r only when the announcement for r is
``open``, lists it, and its rebuilt model has the announced digest. Training
runs elsewhere (a worker process); the result becomes an update encoded with
the codec the announcement names. With error feedback on (the codec's
``ef``, default for biased codecs such as top-k), what the codec dropped
stays in a residual added to the device's next delta; if the aggregator
refuses an update as late or rejected, its content goes back into the
residual, so nothing is lost.

Exactly once. What a device contributes to is a (round, model) pair: the
announcement's ``round`` and ``model_digest``, which the update names as its
``round`` and ``base_model``. The aggregator folds an update only when both
match its open round, and at most once per client and attempt. The device
remembers the last ``HANDLED_KEPT`` pairs it trained or declined
(``AgentState.handled``) and never trains a remembered pair again, so it
never sends two different updates for one round of one model lineage. The
update and the residual are persisted before the update is published; the
same bytes are resent with backoff until the aggregator's receipt for the
current attempt arrives, and again when the same round and model are
re-announced with a higher ``attempt`` (the aggregator restarted). A device
restarted at any moment never trains twice for a pair.

No single message stops a device for good. Nothing is remembered because an
announcement was seen, only what the device did, and there is no high-water
round mark:
- An announcement for a made-up round (round 10**9 naming the real model)
  costs at most one training. The aggregator refuses that update
  (``future_round``), its content goes back into the residual, and the real
  rounds, whose pairs were never handled, are trained as before.
- An aggregator restored from an older checkpoint, or a job started afresh,
  announces rounds below those the device handled. A pair already handled
  is skipped: the first restored round names the same model as before, so
  it runs without the devices that did it then (at worst it fails and the
  model stays). Every other pair is trained. Keys and deltas are ordered by
  the announcement for the same reason: the key or delta the round names is
  adopted even when its round is below the one held, and an older one that
  arrives before the announcement naming it is kept aside until then.
Rejected on purpose:
- A mark coarser than the exact pair (a highest round per model digest or
  per key) can be wedged. If every device marks round 10**9 for model D,
  every real round naming D is refused and fails, so D never changes.
- A bound on how far a round may run ahead of the model's round is not
  tight: consecutive failed rounds keep both the model and the key, and the
  device knows neither ``key_every`` nor the job's length. A bound that
  misfires refuses real rounds, which is the same wedge.
The price: an older announcement redelivered after a newer one (QoS 1) may
start a training for a pair the device never handled. The result is dropped
if the newer announcement arrives first; otherwise the aggregator refuses it
as late and the residual takes it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import numpy as np

from edge_agent.config import DOWNLINKS, check_choice
from edge_agent.secure import SecureSession
from fedge import tensors, wire
from fedge.codecs import CodecError, error_feedback, make_codec
from fedge.downlink import rebuild
from fedge.logs import fields
from fedge.messages import (
    MODEL_UNAVAILABLE,
    Ack,
    Decline,
    GlobalModel,
    Invite,
    ModelDelta,
    ProtocolError,
    RoundAnnouncement,
    SecAggStage,
    Status,
    TrainingPlan,
    Update,
)
from fedge.privacy import noise_rng, privatize
from fedge.secagg import flatten
from fedge.tensors import ModelArrays, TensorError, TensorSpec
from fedge.wire import Kind, WireError

_T = TypeVar("_T")
log = logging.getLogger("fedge.agent")

BUILTIN_MODELS = "fedge.models:"
MAX_RESEND_S = 300.0
CHANNELS = ("key", "delta")

# --- events ----------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    now: float


@dataclass(frozen=True)
class KeyArrived:
    message: bytes
    now: float
    digest: bytes = b""  # its sha256, when the shell has it already (a simulated fleet's shared checks)


@dataclass(frozen=True)
class DeltaArrived:
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


@dataclass(frozen=True)
class ModelBytes:
    """Part of a key or delta arrived (a chunk of a message still incomplete):
    a download is in progress, so the device does not fetch it again."""

    now: float


Event = (Connected | KeyArrived | DeltaArrived | AnnouncementArrived | AckArrived | TrainingDone
         | TrainingFailed | Tick | ModelBytes)

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


@dataclass(frozen=True)
class PersistResidual:
    residual: ModelArrays | None  # error-feedback memory, or None to delete it


@dataclass(frozen=True)
class PersistKey:
    message: bytes  # the key model message, so a restart need not download it again
    digest: bytes = b""  # its sha256, when known (a simulated fleet links identical files)


@dataclass(frozen=True)
class Subscribe:
    channel: str  # "key" or "delta"


@dataclass(frozen=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True)
class Refetch:
    """Subscribe to ``channel`` again although subscribed: the broker then
    sends its retained copy again (MQTT 3.1.1 3.8.4, 5 3.8.4). Partial
    downloads are kept (what comes again is duplicate chunks)."""

    channel: str


Action = (PublishStatus | PublishUpdate | StartTraining | PersistState | PersistResidual | PersistKey
          | Subscribe | Unsubscribe | Refetch)

# --- state -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    round: int
    update_id: str
    base_model: str
    sent_attempt: int = 0  # the announcement attempt we last sent it for
    acked_attempt: int = 0  # 0: no receipt yet
    final: bool = False  # a receipt said late/rejected: never resend
    task: str = ""  # buffered: the task it answers (``round``: the version it was trained from)


HANDLED_KEPT = 32  # (round, model) pairs remembered; covers re-announcements and stale copies
ANY_MODEL = ""  # a round handled by a build that did not record the model (state format 1)


@dataclass
class AgentState:
    """What survives a restart (besides the key model and the residual): the
    (round, model digest) pairs this device trained or declined, newest last,
    and the pending update. ``last_round`` is the round of the newest pair,
    for people reading the file; no decision depends on it."""

    last_round: int = 0
    pending: Pending | None = None
    handled: tuple[tuple[int, str], ...] = ()
    tasks: tuple[str, ...] = ()  # buffered: the tasks trained or declined, newest last

    def has_handled(self, round_: int, model: str) -> bool:
        return any(r == round_ and m in (model, ANY_MODEL) for r, m in self.handled)

    def has_task(self, task: str) -> bool:
        return task in self.tasks

    def record_task(self, task: str) -> None:
        self.tasks = (*[t for t in self.tasks if t != task], task)[-HANDLED_KEPT:]

    def record(self, round_: int, model: str) -> None:
        kept = [h for h in self.handled if h != (round_, model)]
        self.handled = (*kept, (round_, model))[-HANDLED_KEPT:]
        self.last_round = round_

    def to_json(self) -> dict[str, Any]:
        return {"format": 2, "last_round": self.last_round, "handled": [list(h) for h in self.handled],
                "tasks": list(self.tasks), "pending": None if self.pending is None else dict(self.pending.__dict__)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AgentState:
        raw = obj.get("pending")
        pending = Pending(**raw) if raw else None
        last = int(obj.get("last_round", 0))
        if "handled" in obj:
            handled = tuple((int(r), str(m)) for r, m in obj["handled"])
        elif last:
            # Format 1 kept only a high-water round: keep that round as
            # handled (for any model unless the pending update names it),
            # without letting it hide the rounds below.
            model = pending.base_model if pending is not None and pending.round == last else ANY_MODEL
            handled = ((last, model),)
        else:
            handled = ()
        tasks = tuple(str(t) for t in obj.get("tasks", []))
        return cls(last_round=last, pending=pending, handled=handled[-HANDLED_KEPT:], tasks=tasks[-HANDLED_KEPT:])


@dataclass
class _Key:
    model: GlobalModel
    arrays: ModelArrays
    digest: str


@dataclass
class _Current:
    arrays: ModelArrays
    digest: str
    body: bytes  # canonical tensors (safetensors, spec order); arrays are views into it


@dataclass
class _Training:
    job_id: str
    round: int
    base_model: str
    task: str = ""  # buffered: the task it is for


@dataclass
class _SecureInput:
    """A trained update, clipped and flattened, kept in memory while its
    round runs: each attempt of the round masks it afresh."""

    round: int
    base_model: str
    flat: np.ndarray
    num_samples: int
    loss: float
    seconds: float
    model: int  # coordinates of the model; the one after them, if any: adaptive clipping's report


@dataclass
class _Resend:
    at: float
    interval: float


MODEL_REFETCHES = 2  # fetches of a missing model before the round is declined (model_unavailable)


@dataclass
class _ModelWait:
    """Selected for ``round`` (attempt, model) and lacking its model since
    ``since``; the last model bytes (or fetch) at ``progress``."""

    round: int
    attempt: int
    model: str
    since: float
    progress: float
    fetches: int = 0


@dataclass
class AgentCore:
    client_id: str
    job: str
    info: dict[str, Any]
    accepted_model: str = ""  # factory this device accepts; "" = built-ins only
    resend_after_s: float = 20.0
    downlink: str = "on_demand"  # or "follow"
    model_wait_s: float = 30.0  # no model bytes for this long while lacking the announced model: fetch again
    state: AgentState = field(default_factory=AgentState)
    update_bytes: bytes | None = None  # bytes of state.pending, restored by the shell
    residual: ModelArrays | None = None  # error-feedback memory, restored by the shell
    new_id: Callable[[], str] = field(default=lambda: uuid.uuid4().hex, repr=False)  # update and training ids
    # Models decoded for other devices of this process (a simulated fleet):
    # the same bytes give the same model, decoded once and held once.
    memo: ModelMemo | None = field(default=None, repr=False)

    key: _Key | None = None
    current: _Current | None = None
    latest_delta: ModelDelta | None = None
    # The latest key (message) and delta that arrived older than the ones
    # held: adopted if an announcement names them (an aggregator restored
    # from an older checkpoint), so the retained copy need not come again.
    spare_key: tuple[str, bytes] | None = None
    spare_delta: ModelDelta | None = None
    announcement: RoundAnnouncement | None = None
    training: _Training | None = None
    resend: _Resend | None = None
    subscribed: set[str] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)
    session: SecureSession | None = None  # the secure aggregation of the open round's attempt
    secure_input: _SecureInput | None = None
    model_wait: _ModelWait | None = None
    # The latest invitation to a round too large to list its devices:
    # (round, attempt, model digest). Not kept over a restart: the
    # aggregator invites a device again when its presence comes back.
    invite: tuple[int, int, str] | None = None
    # Buffered: the latest task the aggregator asked of this device (task
    # id, the version it was issued at); likewise not kept over a restart.
    task: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        check_choice(self.downlink, DOWNLINKS, "agent.downlink")
        # 1 to 1.25, by device: a fleet selected together does not fetch a late model again in step.
        self._spread = 1.0 + int.from_bytes(hashlib.sha256(self.client_id.encode()).digest()[:2], "big") / 262144

    # --- entry points ----------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, ModelBytes):
            if self.model_wait is not None:
                self.model_wait.progress = event.now
            return []
        if isinstance(event, Connected):
            # The link re-subscribes what this process subscribed, so only the
            # unwanted channels need stating: the broker may remember them
            # from an earlier process (persistent session). Subscribing a
            # wanted channel again would make the broker resend its retained
            # model, a second full download on every reconnect.
            actions: list[Action] = [PublishStatus(self.status("online"))]
            actions += [Unsubscribe(c) for c in CHANNELS if c not in self._wanted()]
            return actions + self._sync_subscriptions()
        if isinstance(event, KeyArrived):
            actions = self._on_key(event.message, message_digest=event.digest)
        elif isinstance(event, DeltaArrived):
            actions = self._on_delta(event.message)
        elif isinstance(event, AnnouncementArrived):
            actions = self._on_announcement(event)
        elif isinstance(event, AckArrived):
            actions = self._on_ack(event)
        elif isinstance(event, TrainingDone):
            actions = self._on_done(event)
        elif isinstance(event, TrainingFailed):
            actions = self._on_failed(event)
        elif isinstance(event, Tick):
            actions = self._on_tick(event.now)
        else:
            raise TypeError(f"unknown event {event!r}")
        now = getattr(event, "now", 0.0)
        if isinstance(event, (KeyArrived, DeltaArrived)):
            actions += self._consider(now)
        return actions + self._sync_subscriptions()

    def status(self, state: str) -> bytes:
        return Status(self.client_id, state, self.info if state == "online" else {}).encode()

    def restore_key(self, message: bytes) -> None:
        """Adopt a key model persisted by an earlier run (no actions)."""
        self._on_key(message, persist=False)

    # --- the model -------------------------------------------------------------

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _allowed(self, factory: str) -> bool:
        return factory == self.accepted_model if self.accepted_model else factory.startswith(BUILTIN_MODELS)

    def _on_key(self, message: bytes, persist: bool = True, message_digest: bytes = b"") -> list[Action]:
        try:
            if self.memo is None:
                model, arrays = _decode_key(message)
            else:
                message_digest = message_digest or hashlib.sha256(message).digest()
                model, arrays = self.memo.get(("key", message_digest), lambda: _decode_key(message))
        except (WireError, ProtocolError, TensorError) as exc:
            self._count("bad_model")
            log.warning("%s: ignored a key model: %s", self.client_id, exc, extra=fields(device=self.client_id))
            return []
        if model.job != self.job:
            self._count("bad_model")
            log.warning("%s: ignored a key model of job %r", self.client_id, model.job,
                        extra=fields(device=self.client_id))
            return []
        if not self._allowed(model.model):
            self._count("refused_model")
            log.error("%s: refused global model factory %r: set agent.model to it if this device should run it",
                      self.client_id, model.model, extra=fields(device=self.client_id))
            return []
        digest = hashlib.sha256(model.body).hexdigest()
        if self.key is not None and digest == self.key.digest:
            return []
        named = self.announcement is not None and self.announcement.key_digest == digest
        if self.key is not None and model.round < self.key.model.round and not named:
            # An older retained copy after a newer one, or the key of an
            # aggregator restored from an older checkpoint whose
            # announcement is still to come: the announcement decides.
            self.spare_key = (digest, message)
            return []
        if self.spare_key is not None and self.spare_key[0] == digest:
            self.spare_key = None
        self.key = _Key(model, arrays, digest)
        if self.announcement is None or self.announcement.model_digest == digest:
            self.current = _Current(arrays, digest, model.body)
        self._apply_delta()
        return [PersistKey(message, message_digest)] if persist else []

    def _on_delta(self, message: bytes) -> list[Action]:
        try:
            delta = ModelDelta.parse(wire.decode(message))
        except (WireError, ProtocolError) as exc:
            self._count("bad_delta")
            log.warning("%s: ignored a model delta: %s", self.client_id, exc, extra=fields(device=self.client_id))
            return []
        if delta.job != self.job:
            return []
        named = self.announcement is not None and self.announcement.model_digest == delta.target_digest
        if self.latest_delta is None or delta.round >= self.latest_delta.round or named:
            self.latest_delta = delta
        else:
            self.spare_delta = delta  # as for keys: adopted if an announcement names it
        self._apply_delta()
        return []

    def _apply_delta(self) -> None:
        """Rebuild the current model from the key and the latest delta, when
        the delta builds on the key this device holds."""
        d, key = self.latest_delta, self.key
        if d is None or key is None or d.key_digest != key.digest:
            return
        if self.current is not None and self.current.digest == d.target_digest:
            return
        try:
            if self.memo is None:
                body, digest = _rebuild(key, d)
            else:
                memo_key = ("delta", key.digest, hashlib.sha256(d.body).digest(), json.dumps(d.codec, sort_keys=True))
                body, digest = self.memo.get(memo_key, lambda: _rebuild(key, d))
        except (CodecError, TensorError) as exc:
            self._count("bad_delta")
            log.warning("%s: cannot apply the delta of round %d: %s", self.client_id, d.round, exc,
                        extra=fields(device=self.client_id))
            self.latest_delta = None
            return
        if digest != d.target_digest:
            # Never train on a model that is not the announced one: drop the
            # delta; the next key (or a re-subscription to it) resynchronises.
            self._count("corrupt_delta")
            log.error("%s: the model rebuilt from key round %d and delta round %d does not match its digest; "
                      "waiting for a key model", self.client_id, key.model.round, d.round,
                      extra=fields(device=self.client_id))
            self.latest_delta = None
            return
        self.current = _Current(tensors.unpack(body), digest, body)

    def _has_announced_model(self) -> bool:
        ann = self.announcement
        return ann is not None and self.current is not None and self.current.digest == ann.model_digest

    def _wanted(self) -> set[str]:
        ann = self.announcement
        if ann is None or ann.state == "done":
            return {"key", "delta"} if self.downlink == "follow" and ann is None else set()
        key_ok = self.key is not None and self.key.digest == ann.key_digest
        if self.downlink == "follow":
            return {"delta"} | (set() if key_ok else {"key"})
        due = self._due_task(ann) is not None if ann.buffered else (
            self._open_for_me(ann) and not self.state.has_handled(ann.round, ann.model_digest))
        needed = due and self.training is None and not self._has_announced_model()
        if not needed:
            return set()
        return (set() if key_ok else {"key"}) | ({"delta"} if ann.model_digest != ann.key_digest else set())

    def _sync_subscriptions(self) -> list[Action]:
        wanted = self._wanted()
        actions: list[Action] = [Subscribe(c) for c in CHANNELS if c in wanted and c not in self.subscribed]
        actions += [Unsubscribe(c) for c in CHANNELS if c in self.subscribed and c not in wanted]
        self.subscribed = wanted
        return actions

    # --- the round -------------------------------------------------------------

    def _on_announcement(self, ev: AnnouncementArrived) -> list[Action]:
        try:
            ann = RoundAnnouncement.parse(wire.decode(ev.message))
        except (WireError, ProtocolError) as exc:
            self._count("bad_announcement")
            log.warning("%s: ignored a round announcement: %s", self.client_id, exc,
                        extra=fields(device=self.client_id))
            return []
        if ann.job != self.job:
            return []
        prev = self.announcement
        self.announcement = ann
        if self.secure_input is not None and (ann.round, ann.model_digest) != (
                self.secure_input.round, self.secure_input.base_model):
            self.secure_input = None
        if self.session is not None and (ann.round, ann.attempt) != (self.session.round, self.session.attempt):
            self.session = None
        if ann.state == "done" and (prev is None or prev.state != "done"):
            log.info("%s: job %s is done", self.client_id, self.job, extra=fields(device=self.client_id))
        actions = self._adopt_spares(ann)
        if self.key is not None and self.key.digest == ann.model_digest and not self._has_announced_model():
            self.current = _Current(self.key.arrays, self.key.digest, self.key.model.body)
        return actions + self._consider(ev.now)

    def _adopt_spares(self, ann: RoundAnnouncement) -> list[Action]:
        """Adopt the older key or delta kept aside if this announcement
        names it."""
        d = self.spare_delta
        if d is not None and d.target_digest == ann.model_digest and (
                self.latest_delta is None or self.latest_delta.target_digest != ann.model_digest):
            self.latest_delta, self.spare_delta = d, None
        actions: list[Action] = []
        spare = self.spare_key
        if spare is not None and spare[0] == ann.key_digest and (self.key is None or self.key.digest != spare[0]):
            actions = self._on_key(spare[1])
        self._apply_delta()
        return actions

    def _on_ack(self, ev: AckArrived) -> list[Action]:
        try:
            env = wire.decode(ev.message)
            if env.kind == Kind.SECAGG:
                return self._on_secagg(SecAggStage.parse(env), ev.now)
            if env.kind == Kind.INVITE:
                return self._on_invite(Invite.parse(env), ev.now)
            ack = Ack.parse(env)
        except (WireError, ProtocolError) as exc:
            self._count("bad_ack")
            log.warning("%s: ignored a receipt: %s", self.client_id, exc, extra=fields(device=self.client_id))
            return []
        p = self.state.pending
        if ack.client != self.client_id or p is None or ack.update_id != p.update_id or ack.round != p.round:
            return []
        if ack.status in ("accepted", "duplicate"):
            self._count(f"update_{ack.status}")
            self.state.pending = replace(p, acked_attempt=max(p.acked_attempt, ack.attempt))
            if not self._needs_sending(self.state.pending):
                self.resend = None
            return [PersistState(self.state.to_json(), self.update_bytes)]
        if p.final:
            return []
        self.resend = None
        self._count(f"update_{ack.status}")
        log.error("%s: round %d update was %s: %s", self.client_id, ack.round, ack.status, ack.reason,
                  extra=fields(device=self.client_id, round=ack.round, status=ack.status, reason=ack.reason[:80]))
        self.state.pending = replace(p, final=True)
        actions: list[Action] = [PersistState(self.state.to_json(), self.update_bytes)]
        return actions + self._restore_unsent()

    def _on_invite(self, inv: Invite, now: float) -> list[Action]:
        """Selected for a round whose announcement does not list its devices."""
        if inv.job != self.job or inv.client != self.client_id:
            self._count("bad_invite")
            return []
        if inv.task:
            self.task = (inv.task, inv.round)
            self._count("invited")
            return self._consider(now)
        self.invite = (inv.round, inv.attempt, inv.model_digest)
        self._count("invited")
        return self._consider(now)

    # --- secure aggregation ------------------------------------------------------

    def _on_secagg(self, msg: SecAggStage, now: float) -> list[Action]:
        """The aggregator's next stage for this device: answer it, and send
        the masked input once it can be made."""
        s = self.session
        if s is None:
            self._count("secagg_stray")
            return []
        out = s.on_stage(msg)
        if isinstance(out, str):
            self._count(out)
            log.warning("%s: ignored a secagg %s message (%s)", self.client_id, msg.stage, out,
                        extra=fields(device=self.client_id))
            return []
        actions: list[Action] = [] if out is None else [PublishUpdate(out.encode())]
        return actions + self._secure_send(now)

    def _secure_begin(self, ann: RoundAnnouncement) -> list[Action]:
        """A securely aggregated attempt that selected this device: fresh
        keys (sent at once, while training runs). A device that already
        trained for this round but no longer holds the update (it
        restarted) sits the attempt out: it never trains twice."""
        assert ann.secagg is not None
        s = self.session
        if s is not None and (s.round, s.attempt) == (ann.round, ann.attempt):
            return []
        inp = self.secure_input
        have = inp is not None and (inp.round, inp.base_model) == (ann.round, ann.model_digest)
        if self.state.has_handled(ann.round, ann.model_digest) and not have:
            return []
        self.session = SecureSession(self.client_id, self.job, ann.round, ann.attempt, ann.secagg)
        if have:
            assert inp is not None
            self.session.set_update(inp.flat, noise_rng(), inp.model)
        self._count("secagg_sessions")
        return [PublishUpdate(self.session.keys().encode())]

    def _secure_done(self, t: _Training, ev: TrainingDone, ann: RoundAnnouncement) -> list[Action]:
        """Training finished for a secure round: clip (privacy), flatten,
        and add the adaptive clip report as one more coordinate (the
        aggregator may see it only in the sum)."""
        assert ann.secagg is not None and self.key is not None
        target, bit = ev.delta, None
        if ann.dp is not None:
            # Clip (and report); a distributed round's noise is added in
            # integers after rounding, by the session (DDGauss).
            target, clipped, bit = privatize(target, replace(ann.dp, noise_std=0.0, bit_std=0.0), noise_rng())
            self._count("dp_clipped" if clipped else "dp_within_clip")
        try:
            flat = flatten(target, self.key.model.spec.names)
        except KeyError as exc:
            return self._decline(t, f"the trained update lacks tensor {exc}")
        if bit is not None:
            flat = np.append(flat, bit * ann.secagg.bound)
        self.secure_input = _SecureInput(t.round, t.base_model, flat, ev.num_samples, ev.loss, ev.seconds,
                                         self.key.model.spec.num_params)
        self.state.record(t.round, t.base_model)
        self.residual = None  # secure rounds keep no error feedback: nothing of an update stays behind
        s = self.session
        if s is not None and (s.round, s.attempt) == (ann.round, ann.attempt):
            s.set_update(flat, noise_rng(), self.secure_input.model)
        return [PersistResidual(None), PersistState(self.state.to_json(), self.update_bytes),
                *self._secure_send(ev.now)]

    def _secure_send(self, now: float) -> list[Action]:
        """The update with the masked input, once the session has both the
        trained update and the shares routed to it (once per attempt)."""
        s, inp, ann = self.session, self.secure_input, self.announcement
        if s is None or inp is None or ann is None or not self._open_for_me(ann) or (ann.round, ann.attempt) != (
                s.round, s.attempt):
            return []
        body = s.masked_body()
        if body is None:
            return []
        update = Update(
            job=self.job, round=inp.round, sender=self.client_id, update_id=self.new_id()[:16],
            num_samples=inp.num_samples, codec=ann.codec, base_model=inp.base_model, body=body, loss=inp.loss,
            train_seconds=round(inp.seconds, 4), attempt=ann.attempt,
        )
        message = update.encode()
        self.state.pending = Pending(inp.round, update.update_id, inp.base_model, sent_attempt=ann.attempt)
        self.update_bytes = message
        self.resend = _Resend(now + self.resend_after_s, self.resend_after_s)
        self._count("updates_sent")
        return [PersistState(self.state.to_json(), message), PublishUpdate(message)]

    def _restore_unsent(self) -> list[Action]:
        """The aggregator did not count the pending update: with error
        feedback on, its content goes back into the residual."""
        ann, body = self.announcement, self.update_bytes
        if self.residual is None or body is None or ann is None:
            return []
        try:
            upd = Update.parse(wire.decode(body))
            sent = make_codec(upd.codec).decode(upd.body, TensorSpec.of(self.residual))
        except (WireError, ProtocolError, CodecError, TensorError):
            return []
        self.residual = {k: (self.residual[k] + sent[k]).astype(np.float32) for k in self.residual}
        return [PersistResidual(self.residual)]

    def _on_done(self, ev: TrainingDone) -> list[Action]:
        t = self.training
        if t is None or t.job_id != ev.job_id:
            return []
        self.training = None
        ann = self.announcement
        if t.task:
            stale = self._buffered_gone(ann, t.round)
            if stale is not None:
                self._count("stale_training")
                log.info("%s: task %s: %s; declining it", self.client_id, t.task, stale,
                         extra=fields(device=self.client_id, round=t.round, reason="stale_training"))
                return self._decline(t, f"stale: {stale}") + self._consider(ev.now)
        elif not self._open_for_me(ann) or ann is None or ann.round != t.round or ann.model_digest != t.base_model:
            self._count("stale_training")
            log.info("%s: round %d closed before training finished; result dropped", self.client_id, t.round,
                     extra=fields(device=self.client_id, round=t.round, reason="stale_training"))
            return self._consider(ev.now)
        assert ann is not None  # (a buffered task's: _buffered_gone says so)
        if ann.secagg is not None:
            return self._secure_done(t, ev, ann)
        try:
            codec = make_codec(ann.codec)
            rng = np.random.default_rng(_seed(self.client_id, t.round, "encode"))
            ef = error_feedback(ann.codec)
            target = _with_residual(ev.delta, self.residual if ef else None)
            bit: float | None = None
            if ann.dp is not None:
                # Differential privacy: clip before compression (the residual
                # included), then this device's noise share, if it has one.
                target, clipped, bit = privatize(target, ann.dp, noise_rng())
                self._count("dp_clipped" if clipped else "dp_within_clip")
                # The quantization error of a noisy update is mostly that of
                # the noise: fed back, it would spend the next clip on noise.
                ef = ef and ann.dp.noise_std == 0
            body = codec.encode(target, rng)
            residual: ModelArrays | None = None
            if ef:
                sent = codec.decode(body, TensorSpec.of(target))
                residual = {k: (target[k] - sent[k]).astype(np.float32) for k in target}
        except (CodecError, TensorError, ValueError) as exc:
            return self._decline(t, f"cannot encode the update: {exc}")
        update = Update(
            job=self.job, round=t.round, sender=self.client_id, update_id=self.new_id()[:16],
            num_samples=ev.num_samples, codec=ann.codec, base_model=t.base_model, body=body,
            loss=ev.loss, train_seconds=round(ev.seconds, 4), clip_bit=bit, task=t.task,
        )
        message = update.encode()
        self.state.record(t.round, t.base_model)
        if t.task:
            self.state.record_task(t.task)
        self.state.pending = Pending(t.round, update.update_id, t.base_model, sent_attempt=ann.attempt, task=t.task)
        self.update_bytes = message
        self.residual = residual
        self.resend = _Resend(ev.now + self.resend_after_s, self.resend_after_s)
        self._count("updates_sent")
        return [PersistResidual(residual), PersistState(self.state.to_json(), message), PublishUpdate(message)]

    def _on_failed(self, ev: TrainingFailed) -> list[Action]:
        t = self.training
        if t is None or t.job_id != ev.job_id:
            return []
        self.training = None
        self._count("training_failed")
        log.error("%s: training for round %d failed: %s", self.client_id, t.round, ev.reason,
                  extra=fields(device=self.client_id, round=t.round, reason="training_failed"))
        ann = self.announcement
        if t.task and self._buffered_gone(ann, t.round) is None:
            return self._decline(t, ev.reason) + self._consider(ev.now)
        if not t.task and ann is not None and ann.round == t.round and self._open_for_me(ann):
            return self._decline(t, ev.reason)
        return self._consider(ev.now)

    def _decline(self, t: _Training, reason: str) -> list[Action]:
        return self._decline_round(t.round, t.base_model, reason, t.task)

    def _decline_round(self, round_: int, model: str, reason: str, task: str = "") -> list[Action]:
        self._count("declined")
        self.state.record(round_, model)
        if task:
            self.state.record_task(task)
        self.state.pending = None
        self.update_bytes = None
        message = Decline(self.job, round_, self.client_id, reason, task=task).encode()
        return [PersistState(self.state.to_json(), None), PublishUpdate(message)]

    def _on_tick(self, now: float) -> list[Action]:
        return self._watch_model(now) + self._resend_due(now)

    def _awaits_model(self) -> bool:
        """Selected for the open round, due to train, and lacking its model."""
        ann = self.announcement
        if ann is not None and ann.buffered:
            return self._due_task(ann) is not None and self.training is None and not self._has_announced_model()
        if ann is None or not self._open_for_me(ann) or self.training is not None or self._has_announced_model():
            return False
        if self.state.has_handled(ann.round, ann.model_digest):
            return False
        p = self.state.pending
        return p is None or (p.round, p.base_model) != (ann.round, ann.model_digest)

    def _model_gap(self, ann: RoundAnnouncement) -> str:
        """What this device lacks to build the announced model, in words."""
        if self.key is None or self.key.digest != ann.key_digest:
            return f"no key model {ann.key_digest[:12]} (round {ann.key_round})"
        d = self.latest_delta
        if d is None or d.target_digest != ann.model_digest:
            return f"no delta from key round {ann.key_round} to model {ann.model_digest[:12]}"
        return f"the delta to model {ann.model_digest[:12]} does not rebuild it"

    def _watch_model(self, now: float) -> list[Action]:
        """A selected device whose announced model does not arrive (the
        broker lost, withheld or replaced a retained key or delta) fetches
        it again after ``model_wait_s`` without model bytes, then after
        twice that, and so on (on a broker that is only slow, a fetch queues
        one more copy of the model for this device: a fleet fetching again
        on a fixed period would bury it); after ``MODEL_REFETCHES`` fetches
        it declines the round, saying why, so that the aggregator publishes
        the model again and the round need not wait for it."""
        ann = self.announcement
        if ann is None or not self._awaits_model():
            self.model_wait = None
            return []
        w = self.model_wait
        if w is None or (w.round, w.attempt, w.model) != (ann.round, ann.attempt, ann.model_digest):
            self.model_wait = _ModelWait(ann.round, ann.attempt, ann.model_digest, now, now)
            return []
        if now - w.progress < self.model_wait_s * self._spread * 2 ** w.fetches:
            return []
        gap = self._model_gap(ann)
        if w.fetches < MODEL_REFETCHES:
            w.fetches += 1
            w.progress = now
            self._count("model_refetch")
            log.warning("%s: round %d: %s after %.0f s; fetching the model again", self.client_id, ann.round, gap,
                        now - w.since, extra=fields(device=self.client_id, round=ann.round, reason="model_refetch"))
            return [Refetch(c) for c in CHANNELS if c in self._wanted()]
        self.model_wait = None
        self._count(MODEL_UNAVAILABLE)
        log.error("%s: round %d: %s after %d fetches in %.0f s; declining the round (the aggregator publishes the "
                  "model again)", self.client_id, ann.round, gap, w.fetches + 1, now - w.since,
                  extra=fields(device=self.client_id, round=ann.round, reason=MODEL_UNAVAILABLE))
        task = self._due_task(ann) or ""
        return self._decline_round(ann.round, ann.model_digest, f"{MODEL_UNAVAILABLE}: {gap}", task)

    def _resend_due(self, now: float) -> list[Action]:
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
        log.info("%s: no receipt for round %d yet; sending the update again", self.client_id, p.round,
                 extra=fields(device=self.client_id, round=p.round, reason="resent"))
        return [PublishUpdate(self.update_bytes)]

    # --- decisions -------------------------------------------------------------

    def _open_for_me(self, ann: RoundAnnouncement | None) -> bool:
        """The round is open and selected this device: listed, or (a round
        too large to list) an invitation to this very attempt of it."""
        if ann is None or ann.state != "open":
            return False
        if ann.by_invitation:
            return self.invite == (ann.round, ann.attempt, ann.model_digest)
        return self.client_id in ann.selected

    def _due_task(self, ann: RoundAnnouncement | None) -> str | None:
        """Buffered: the task this device is asked to train for and has not
        handled, if the job is open."""
        if ann is None or ann.state != "open" or not ann.buffered or self.task is None:
            return None
        return None if self.state.has_task(self.task[0]) else self.task[0]

    def _buffered_gone(self, ann: RoundAnnouncement | None, version: int) -> str | None:
        """Buffered: why an update trained from ``version`` would not be
        taken now (the job is not open, or the version is too stale), or None."""
        if ann is None or not ann.buffered or ann.state != "open":
            return "the job is not open"
        if ann.round - version > ann.max_staleness:
            return (f"trained from version {version}, {ann.round - version} behind version {ann.round} "
                    f"(at most {ann.max_staleness})")
        return None

    def _needs_sending(self, p: Pending | None) -> bool:
        """The pending update belongs to the open round and has no receipt
        for the announcement's current attempt (buffered: it may still be
        taken, and has no receipt for the aggregator's current start)."""
        ann = self.announcement
        if p is not None and p.task:
            return (not p.final and self.update_bytes is not None and ann is not None and p.acked_attempt < ann.attempt
                    and self._buffered_gone(ann, p.round) is None)
        return (
            p is not None and self._open_for_me(ann) and ann is not None and ann.round == p.round
            and not p.final and self.update_bytes is not None and p.base_model == ann.model_digest
            and p.acked_attempt < ann.attempt
            # A masked input is masked for one attempt: never resent to another.
            and (ann.secagg is None or p.sent_attempt == ann.attempt)
        )

    def _consider(self, now: float) -> list[Action]:
        ann = self.announcement
        if ann is not None and ann.buffered:
            return self._consider_buffered(ann, now)
        if not self._open_for_me(ann):
            return []
        assert ann is not None
        p = self.state.pending
        if ann.secagg is not None:
            actions = self._secure_begin(ann)
            if self.state.has_handled(ann.round, ann.model_digest) or self.training is not None:
                return actions
            return actions + self._start_training(ann)
        if p is not None and p.round == ann.round and p.base_model == ann.model_digest:
            # Sent before this process started, or the aggregator re-announced
            # the round (it restarted and lost its sum): send the same bytes.
            if self._needs_sending(p) and (self.resend is None or p.sent_attempt < ann.attempt):
                self.state.pending = replace(p, sent_attempt=ann.attempt)
                self.resend = _Resend(now + self.resend_after_s, self.resend_after_s)
                self._count("resent")
                assert self.update_bytes is not None
                return [PersistState(self.state.to_json(), self.update_bytes), PublishUpdate(self.update_bytes)]
            return []
        if self.state.has_handled(ann.round, ann.model_digest) or self.training is not None:
            return []
        return self._start_training(ann)

    def _consider_buffered(self, ann: RoundAnnouncement, now: float) -> list[Action]:
        """Buffered: send again a pending update the aggregator may have lost
        (it restarted: a higher ``attempt``), and train for a task, on the
        newest version announced."""
        p = self.state.pending
        actions: list[Action] = []
        if p is not None and p.task and self._needs_sending(p) and (
                self.resend is None or p.sent_attempt < ann.attempt):
            self.state.pending = replace(p, sent_attempt=ann.attempt)
            self.resend = _Resend(now + self.resend_after_s, self.resend_after_s)
            self._count("resent")
            assert self.update_bytes is not None
            actions = [PersistState(self.state.to_json(), self.update_bytes), PublishUpdate(self.update_bytes)]
        task = self._due_task(ann)
        if task is None or self.training is not None:
            return actions
        return actions + self._start_training(ann, task)  # and a new task trains meanwhile

    def _start_training(self, ann: RoundAnnouncement, task: str = "") -> list[Action]:
        if not self._has_announced_model() or self.key is None or self.current is None:
            return []  # the model for this round is still on its way
        cur = self.current
        self.training = _Training(self.new_id(), ann.round, cur.digest, task)
        job = TrainJob(
            job_id=self.training.job_id, round=ann.round, base_model=cur.digest,
            model=self.key.model.model, model_args=self.key.model.model_args, model_body=cur.body,
            plan=ann.training, seed=_seed(self.client_id, ann.round, "train"),
        )
        return [StartTraining(job)]


def _decode_key(message: bytes) -> tuple[GlobalModel, ModelArrays]:
    model = GlobalModel.parse(wire.decode(message))
    arrays = tensors.unpack(model.body)
    model.spec.check(arrays, what="key model")
    return model, arrays


def _rebuild(key: _Key, d: ModelDelta) -> tuple[bytes, str]:
    """The model ``d`` builds from ``key``: its canonical bytes (packed once:
    they give the digest, the arrays as views into them and the body a
    training job needs) and their digest."""
    arrays = rebuild(key.arrays, make_codec(d.codec), d.body, key.model.spec)
    body = tensors.pack({n: arrays[n] for n in key.model.spec.names})
    return body, hashlib.sha256(body).hexdigest()  # == tensors.state_digest(arrays)


class ModelMemo:
    """Decoded models shared by the devices of one process (a simulated
    fleet): keyed by a digest of the bytes they were decoded from, so a
    device gets exactly what decoding its own copy would give, and 10,000
    devices hold one copy of the model, not 10,000. The newest ``size``
    are kept. What is shared is never written to (arrays are read-only
    views of immutable bytes). One thread: the runtime's."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: dict[Any, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, make: Callable[[], _T]) -> _T:
        if key in self._items:
            self.hits += 1
            value = self._items.pop(key)
            self._items[key] = value  # the newest
            return cast(_T, value)
        self.misses += 1
        value = make()  # an exception is not remembered: each device meets it
        self._items[key] = value
        while len(self._items) > self.size:
            del self._items[next(iter(self._items))]
        return value


def _with_residual(delta: ModelArrays, residual: ModelArrays | None) -> ModelArrays:
    """delta + residual, when the residual fits this model (a residual of
    another model shape is dropped)."""
    if residual is None:
        return delta
    if set(residual) != set(delta) or any(residual[k].shape != delta[k].shape for k in delta):
        return delta
    return {k: (delta[k] + residual[k]).astype(np.float32) for k in delta}


def _seed(client: str, round_: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{client}/{round_}/{purpose}".encode()).digest()[:8], "little")
