"""The vocabulary of the fedge protocol: one small immutable class per message.

Each class knows its header fields, how to ``encode`` itself into a wire
envelope and how to ``parse`` one back, checking every field a peer could get
wrong. Anything else about a message (is it late? a duplicate? is the sender
selected?) is a decision of the round logic, not of this module.

Field names that appear in every header: ``job``, ``round``, ``sender``,
``num_samples`` and ``codec``; the envelope adds the sha256 of the whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from fedge import wire
from fedge.errors import FedgeError
from fedge.privacy import DpPlan
from fedge.secagg import MAX_DEVICES as SECAGG_MAX_DEVICES
from fedge.secagg import SEALED_BYTES, SecAggError, SecAggPlan
from fedge.tensors import TensorError, TensorSpec
from fedge.topics import check_id
from fedge.wire import Envelope, Kind

AGGREGATOR = "aggregator"
# The most devices a round may list in its announcement (64-character ids:
# 34 KB of the header's 64 KiB); one that selects more (beyond the job's
# selection.list_max, at most this) invites each instead.
LIST_MAX = 500
MAX_SELECTED = 10_000_000  # what a selected_count may claim
SYNCHRONOUS, BUFFERED = "synchronous", "buffered"  # a job's modes, as announcements name them
MAX_STALENESS = 1_000_000
TASK_MAX = 64


class ProtocolError(FedgeError):
    """A well-formed envelope whose header breaks the protocol."""


def _field(h: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in h:
        raise ProtocolError("malformed", f"{what} header lacks {key!r}")
    value = h[key]
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise ProtocolError("malformed", f"{what} header field {key!r} must be a number, got a boolean")
    if not isinstance(value, typ):
        raise ProtocolError("malformed", f"{what} header field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _optional_number(h: dict[str, Any], key: str, what: str, default: float) -> float:
    """A number field that may be absent or null (then ``default``)."""
    value = h.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("malformed", f"{what} header field {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def _clip_bit(h: dict[str, Any]) -> float | None:
    if h.get("clip_bit") is None:
        return None
    value = _optional_number(h, "clip_bit", "update", 0.0)
    if not math.isfinite(value):
        raise ProtocolError("malformed", "update header field 'clip_bit' must be finite")
    return value


def _optional_object(h: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """An object field that may be absent or null (then empty)."""
    value = h.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("malformed", f"{what} header field {key!r} must be an object, got {type(value).__name__}")
    return value


def _id(h: dict[str, Any], key: str, what: str) -> str:
    value = _field(h, key, str, what)
    try:
        return check_id(value, f"{what} {key}")
    except ValueError as exc:
        raise ProtocolError("malformed", str(exc)) from None


def _task(h: dict[str, Any], what: str) -> str:
    """A buffered job's task id: optional, short, printable."""
    task = h.get("task", "")
    if not isinstance(task, str) or len(task) > TASK_MAX or not task.isprintable():
        raise ProtocolError("malformed", f"{what} 'task' must be a printable string of at most {TASK_MAX} "
                            "characters")
    return task


def _expect(env: Envelope, kind: Kind) -> dict[str, Any]:
    if env.kind != kind:
        raise ProtocolError("kind", f"expected a {kind.name} message, got {env.kind.name}")
    return env.header


@dataclass(frozen=True)
class GlobalModel:
    """A key model: the full global model (float32), retained on the key
    topic. Its body is the canonical tensor form, so sha256(body) is the
    model's state digest."""

    job: str
    round: int  # the round whose aggregation produced it; 0 is the initial model
    model: str  # factory "module:attr"
    model_args: dict[str, Any]
    spec: TensorSpec
    body: bytes  # safetensors, float32
    num_samples: int = 0  # samples aggregated into it in that round

    def encode(self) -> bytes:
        header = {
            "job": self.job,
            "round": self.round,
            "sender": AGGREGATOR,
            "num_samples": self.num_samples,
            "codec": {"name": "none"},
            "model": self.model,
            "model_args": self.model_args,
            "spec": self.spec.to_json(),
        }
        return wire.encode(Kind.MODEL, header, self.body)

    @classmethod
    def parse(cls, env: Envelope) -> GlobalModel:
        h = _expect(env, Kind.MODEL)
        try:
            spec = TensorSpec.from_json(h.get("spec"))
        except TensorError as exc:
            raise ProtocolError("malformed", str(exc)) from None
        return cls(
            job=_id(h, "job", "model"),
            round=_field(h, "round", int, "model"),
            model=_field(h, "model", str, "model"),
            model_args=_field(h, "model_args", dict, "model"),
            spec=spec,
            body=env.body,
            num_samples=_field(h, "num_samples", int, "model"),
        )


@dataclass(frozen=True)
class ModelDelta:
    """The current global model as a change from the latest key model,
    encoded with the job's downlink codec and retained on the delta topic.

    The change is cumulative since the key, so any device holding that key
    reaches the current model with this one message, however many rounds it
    missed; ``target_digest`` is the state digest the result must have."""

    job: str
    round: int
    key_round: int
    key_digest: str
    target_digest: str
    codec: dict[str, Any]
    body: bytes

    def encode(self) -> bytes:
        header = {"job": self.job, "round": self.round, "sender": AGGREGATOR, "num_samples": 0,
                  "codec": self.codec, "key_round": self.key_round, "key_digest": self.key_digest,
                  "target_digest": self.target_digest}
        return wire.encode(Kind.MODEL_DELTA, header, self.body)

    @classmethod
    def parse(cls, env: Envelope) -> ModelDelta:
        h = _expect(env, Kind.MODEL_DELTA)
        return cls(
            job=_id(h, "job", "delta"),
            round=_field(h, "round", int, "delta"),
            key_round=_field(h, "key_round", int, "delta"),
            key_digest=_field(h, "key_digest", str, "delta"),
            target_digest=_field(h, "target_digest", str, "delta"),
            codec=_field(h, "codec", dict, "delta"),
            body=env.body,
        )


@dataclass(frozen=True)
class TrainingPlan:
    """How selected clients train this round; sent inside the announcement."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    loss: str = "cross_entropy"
    max_steps: int = 0  # 0: no cap on local steps

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: object) -> TrainingPlan:
        if not isinstance(obj, dict):
            raise ProtocolError("malformed", "training plan must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ProtocolError("malformed", f"training plan has unknown fields {sorted(unknown)}")
        defaults = cls()
        values: dict[str, Any] = {}
        for key, value in obj.items():
            want = type(getattr(defaults, key))
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if isinstance(value, bool) or not ok:
                raise ProtocolError("malformed", f"training plan field {key!r} must be {want.__name__}")
            values[key] = want(value)
        plan = cls(**values)
        if plan.epochs < 1 or plan.batch_size < 1 or not (plan.lr > 0) or plan.prox_mu < 0:
            raise ProtocolError("malformed", f"training plan out of range: {obj}")
        return plan


@dataclass(frozen=True)
class RoundAnnouncement:
    """Retained on the round topic. ``state`` is ``open`` while a round runs,
    ``waiting`` while the aggregator waits for enough clients, ``done`` when
    the job has finished. ``model_digest`` is the state digest of the model
    to train from; ``key_digest``/``key_round`` name the key model the
    retained delta builds on.

    Who is selected: ``selected`` lists them when they are at most
    ``selection.list_max`` (at most ``LIST_MAX``); a larger round lists none (every device downloads
    the announcement, and a list of thousands would grow it past the
    header's limit) and sends each selected device an ``Invite`` on its own
    receipt topic. ``selected_count`` is how many were selected either way.

    ``mode`` is ``synchronous`` (rounds, above) or ``buffered``
    (buffered asynchronous aggregation): then ``round`` is the model version
    being built, nobody is listed, a device trains only on an ``Invite``
    naming a ``task``, it keeps training when the version moves on, and its
    update is taken if it was trained at most ``max_staleness`` versions
    ago."""

    job: str
    round: int
    attempt: int
    state: str
    model_digest: str
    selected: tuple[str, ...] = ()
    deadline_s: float = 0.0
    training: TrainingPlan = field(default_factory=TrainingPlan)
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "int8"})
    issued_at: float = 0.0
    key_digest: str = ""
    key_round: int = 0
    dp: DpPlan | None = None  # the round is differentially private: clip (and noise) as it says
    secagg: SecAggPlan | None = None  # the round is securely aggregated (codec {"name": "secagg"})
    selected_count: int = -1  # -1: len(selected)
    mode: str = SYNCHRONOUS  # or BUFFERED
    max_staleness: int = 0  # buffered: the oldest version an update may be trained from is round - this

    def __post_init__(self) -> None:
        if self.selected_count < 0:
            object.__setattr__(self, "selected_count", len(self.selected))

    @property
    def by_invitation(self) -> bool:
        """Selected devices are told by an ``Invite`` each, not listed here."""
        return self.selected_count > len(self.selected)

    @property
    def buffered(self) -> bool:
        return self.mode == BUFFERED

    def encode(self) -> bytes:
        header = {
            "job": self.job,
            "round": self.round,
            "attempt": self.attempt,
            "state": self.state,
            "sender": AGGREGATOR,
            "num_samples": 0,
            "model_digest": self.model_digest,
            "key_digest": self.key_digest,
            "key_round": self.key_round,
            "selected": list(self.selected),
            "selected_count": self.selected_count,
            "deadline_s": self.deadline_s,
            "training": self.training.to_json(),
            "codec": self.codec,
            "issued_at": self.issued_at,
        }
        if self.dp is not None:
            header["dp"] = self.dp.to_json()
        if self.secagg is not None:
            header["secagg"] = self.secagg.to_json()
        if self.mode != SYNCHRONOUS:  # a synchronous job's announcement is as older builds read it
            header["mode"] = self.mode
            header["max_staleness"] = self.max_staleness
        return wire.encode(Kind.ROUND, header)

    @classmethod
    def parse(cls, env: Envelope) -> RoundAnnouncement:
        h = _expect(env, Kind.ROUND)
        state = _field(h, "state", str, "round")
        if state not in ("open", "waiting", "done"):
            raise ProtocolError("malformed", f"unknown round state {state!r}")
        selected = _field(h, "selected", list, "round")
        if not all(isinstance(s, str) for s in selected):
            raise ProtocolError("malformed", "round 'selected' must list client ids")
        count = h.get("selected_count", len(selected))
        if not isinstance(count, int) or isinstance(count, bool) or not len(selected) <= count <= MAX_SELECTED:
            raise ProtocolError("malformed", f"round 'selected_count' {count!r} is not a count of at least "
                                f"{len(selected)} and at most {MAX_SELECTED}")
        training = TrainingPlan.from_json(h.get("training"))
        mode = h.get("mode", SYNCHRONOUS)
        if mode not in (SYNCHRONOUS, BUFFERED):
            raise ProtocolError("malformed", f"unknown round mode {mode!r}")
        staleness = h.get("max_staleness", 0)
        if not isinstance(staleness, int) or isinstance(staleness, bool) or not 0 <= staleness <= MAX_STALENESS:
            raise ProtocolError("malformed", f"round 'max_staleness' {staleness!r} is not a count of versions "
                                f"from 0 to {MAX_STALENESS}")
        try:
            dp = None if h.get("dp") is None else DpPlan.from_json(h["dp"])
        except ValueError as exc:
            raise ProtocolError("malformed", f"round {exc}") from None
        try:
            secagg = None if h.get("secagg") is None else SecAggPlan.from_json(h["secagg"])
        except SecAggError as exc:
            raise ProtocolError("malformed", f"round {exc}") from None
        return cls(
            job=_id(h, "job", "round"),
            round=_field(h, "round", int, "round"),
            attempt=_field(h, "attempt", int, "round"),
            state=state,
            model_digest=_field(h, "model_digest", str, "round"),
            selected=tuple(selected),
            deadline_s=float(_field(h, "deadline_s", (int, float), "round")),
            training=training,
            codec=_field(h, "codec", dict, "round"),
            issued_at=float(_field(h, "issued_at", (int, float), "round")),
            key_digest=_field(h, "key_digest", str, "round"),
            key_round=_field(h, "key_round", int, "round"),
            dp=dp,
            secagg=secagg,
            selected_count=count,
            mode=mode,
            max_staleness=staleness,
        )


@dataclass(frozen=True)
class Invite:
    """Sent to one device on its receipt topic: it is selected for the
    round ``round`` (attempt ``attempt``) of the model ``model_digest``,
    which the retained announcement describes without listing who is.

    In a buffered job, ``task`` names one training the aggregator asks of
    the device (``round``: the version at the time): the device trains
    once for it, on the newest version it can build, and its update names
    the task."""

    job: str
    round: int
    attempt: int
    client: str
    model_digest: str
    task: str = ""

    def encode(self) -> bytes:
        header = {"job": self.job, "round": self.round, "attempt": self.attempt, "sender": AGGREGATOR,
                  "client": self.client, "model_digest": self.model_digest, "num_samples": 0, "codec": None}
        if self.task:
            header["task"] = self.task
        return wire.encode(Kind.INVITE, header)

    @classmethod
    def parse(cls, env: Envelope) -> Invite:
        h = _expect(env, Kind.INVITE)
        return cls(
            job=_id(h, "job", "invite"),
            round=_field(h, "round", int, "invite"),
            attempt=_field(h, "attempt", int, "invite"),
            client=_id(h, "client", "invite"),
            model_digest=_field(h, "model_digest", str, "invite"),
            task=_task(h, "invite"),
        )


@dataclass(frozen=True)
class Update:
    """A client's compressed delta for one round. Identified by
    (job, round, sender, update_id) and counted at most once."""

    job: str
    round: int
    sender: str
    update_id: str
    num_samples: int
    codec: dict[str, Any]
    base_model: str  # state digest of the global model it was trained from
    body: bytes
    loss: float = 0.0
    train_seconds: float = 0.0
    clip_bit: float | None = None  # adaptive clipping's report (fedge.privacy.clip_bit), if asked for
    # Secure aggregation: the round attempt whose masks the body carries (a
    # masked input is worth nothing to another attempt).
    attempt: int | None = None
    task: str = ""  # buffered: the invitation's task it answers ("round" is then the version it trained from)

    def encode(self) -> bytes:
        header = {
            "job": self.job,
            "round": self.round,
            "sender": self.sender,
            "update_id": self.update_id,
            "num_samples": self.num_samples,
            "codec": self.codec,
            "base_model": self.base_model,
            "loss": self.loss if math.isfinite(self.loss) else None,
            "train_seconds": self.train_seconds,
        }
        if self.clip_bit is not None:
            header["clip_bit"] = self.clip_bit
        if self.attempt is not None:
            header["attempt"] = self.attempt
        if self.task:
            header["task"] = self.task
        return wire.encode(Kind.UPDATE, header, self.body)

    @classmethod
    def parse(cls, env: Envelope) -> Update:
        h = _expect(env, Kind.UPDATE)
        return cls(
            job=_id(h, "job", "update"),
            round=_field(h, "round", int, "update"),
            sender=_id(h, "sender", "update"),
            update_id=_field(h, "update_id", str, "update"),
            num_samples=_field(h, "num_samples", int, "update"),
            codec=_field(h, "codec", dict, "update"),
            base_model=_field(h, "base_model", str, "update"),
            body=env.body,
            loss=_optional_number(h, "loss", "update", math.nan),
            train_seconds=_optional_number(h, "train_seconds", "update", 0.0),
            clip_bit=_clip_bit(h),
            attempt=None if h.get("attempt") is None else _field(h, "attempt", int, "update"),
            task=_task(h, "update"),
        )


# A selected device that cannot build the announced model from what the broker
# holds (a retained key or delta lost, withheld or replaced) declines with this
# code; the aggregator then publishes the model again.
MODEL_UNAVAILABLE = "model_unavailable"


@dataclass(frozen=True)
class Decline:
    """A selected client that will not deliver this round (training failed,
    out of memory, no data), so the round need not wait for it."""

    job: str
    round: int
    sender: str
    reason: str  # "<code>: <words>" for the reasons an aggregator acts on (MODEL_UNAVAILABLE)
    task: str = ""  # buffered: the task it declines

    @property
    def code(self) -> str:
        """The reason's code: the word before its first ':' ('' if none)."""
        head, sep, _ = self.reason.partition(":")
        return head if sep and head.isidentifier() else ""

    def encode(self) -> bytes:
        header = {"job": self.job, "round": self.round, "sender": self.sender, "num_samples": 0,
                  "codec": None, "reason": self.reason[:500]}
        if self.task:
            header["task"] = self.task
        return wire.encode(Kind.DECLINE, header)

    @classmethod
    def parse(cls, env: Envelope) -> Decline:
        h = _expect(env, Kind.DECLINE)
        return cls(
            job=_id(h, "job", "decline"),
            round=_field(h, "round", int, "decline"),
            sender=_id(h, "sender", "decline"),
            reason=str(h.get("reason", ""))[:500],
            task=_task(h, "decline"),
        )


@dataclass(frozen=True)
class Status:
    """Retained presence of a client (or the aggregator). The last will
    carries ``state='offline'``."""

    sender: str
    state: str  # "online" | "offline"
    info: dict[str, Any] = field(default_factory=dict)
    # Grows with every presence a sender publishes (signed presence: an older
    # one replayed is refused); 0: not counted.
    seq: int = 0

    def encode(self) -> bytes:
        header: dict[str, Any] = {"sender": self.sender, "state": self.state, "info": self.info}
        if self.seq:
            header["seq"] = self.seq
        return wire.encode(Kind.STATUS, header)

    @classmethod
    def parse(cls, env: Envelope) -> Status:
        h = _expect(env, Kind.STATUS)
        state = _field(h, "state", str, "status")
        if state not in ("online", "offline"):
            raise ProtocolError("malformed", f"unknown presence state {state!r}")
        seq = h.get("seq", 0)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ProtocolError("malformed", "status header field 'seq' must be a non-negative integer")
        return cls(sender=_id(h, "sender", "status"), state=state, info=_optional_object(h, "info", "status"),
                   seq=seq)


# What a device's presence info may say that a fleet view shows: key -> type.
DEVICE_INFO = {"role": str, "ram_mb": int, "cpus": int, "arch": str, "board": str, "os": str, "python": str,
               "fedge": str, "torch": str, "onnxruntime": str, "codecs": list}
MAX_INFO_TEXT = 120


def device_info(info: dict[str, Any]) -> dict[str, Any]:
    """The parts of a presence's ``info`` a fleet view shows, typed and
    bounded; anything else (or of the wrong type) is dropped."""
    out: dict[str, Any] = {}
    for key, typ in DEVICE_INFO.items():
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, typ):
            continue
        if isinstance(value, str):
            value = value[:MAX_INFO_TEXT]
        elif isinstance(value, int):
            value = max(0, min(value, 1 << 40))
        elif isinstance(value, list):
            value = [v[:40] for v in value[:32] if isinstance(v, str)]
        out[key] = value
    return out


@dataclass(frozen=True)
class DeviceRecord:
    """The aggregator's record of one device, retained on
    ``fedge/v1/<job>/device/<id>`` for ``fedge status``: whether it is
    online, when the aggregator last heard from it (the aggregator's clock),
    the rounds it contributed to, its last receipt, and what its presence
    said about it (``device_info``)."""

    job: str
    device: str
    online: bool
    last_seen: float  # Unix time, the aggregator's clock; 0: never
    rounds: int  # updates of this device the aggregator accepted
    last_receipt: str  # "accepted", "duplicate", "late", "rejected: <reason>"; "" before any
    last_round: int  # the round of that receipt, or the last one the device was selected for
    info: dict[str, Any] = field(default_factory=dict)  # as ``device_info`` returns it

    def encode(self) -> bytes:
        # ``info`` is not filtered again here: the aggregator keeps it as
        # ``device_info`` returned it, and a reader's ``parse`` filters it.
        header = {"job": self.job, "round": self.last_round, "sender": AGGREGATOR, "device": self.device,
                  "online": self.online, "last_seen": round(self.last_seen, 3), "rounds": self.rounds,
                  "last_receipt": self.last_receipt[:200], "info": self.info}
        return wire.encode(Kind.DEVICE, header)

    @classmethod
    def parse(cls, env: Envelope) -> DeviceRecord:
        h = _expect(env, Kind.DEVICE)
        rounds = _field(h, "rounds", int, "device record")
        last_round = _field(h, "round", int, "device record")
        last_seen = _optional_number(h, "last_seen", "device record", 0.0)
        if rounds < 0 or last_round < 0 or not (math.isfinite(last_seen) and last_seen >= 0):
            raise ProtocolError("malformed", "device record counts and times must not be negative")
        return cls(
            job=_id(h, "job", "device record"), device=_id(h, "device", "device record"),
            online=_field(h, "online", bool, "device record"), last_seen=last_seen, rounds=rounds,
            last_receipt=_field(h, "last_receipt", str, "device record")[:200], last_round=last_round,
            info=device_info(_optional_object(h, "info", "device record")),
        )


@dataclass(frozen=True)
class Ack:
    """The aggregator's receipt for one update: ``accepted``, ``duplicate``
    (already counted), ``late`` or ``rejected`` (with a reason)."""

    job: str
    round: int
    attempt: int
    client: str
    update_id: str
    status: str
    reason: str = ""

    def encode(self) -> bytes:
        header = {"job": self.job, "round": self.round, "attempt": self.attempt, "sender": AGGREGATOR,
                  "client": self.client, "update_id": self.update_id, "status": self.status,
                  "reason": self.reason, "num_samples": 0, "codec": None}
        return wire.encode(Kind.ACK, header)

    @classmethod
    def parse(cls, env: Envelope) -> Ack:
        h = _expect(env, Kind.ACK)
        return cls(
            job=_id(h, "job", "ack"),
            round=_field(h, "round", int, "ack"),
            attempt=_field(h, "attempt", int, "ack"),
            client=_id(h, "client", "ack"),
            update_id=_field(h, "update_id", str, "ack"),
            status=_field(h, "status", str, "ack"),
            reason=str(h.get("reason", "")),
        )


MAX_COUNT = 10_000_000  # what a count in a region's sum may claim


def _count(h: dict[str, Any], key: str, what: str) -> int:
    value = _field(h, key, int, what)
    if not 0 <= value <= MAX_COUNT:
        raise ProtocolError("malformed", f"{what} header field {key!r} must be in [0, {MAX_COUNT}]")
    return int(value)


def _non_negative(h: dict[str, Any], key: str, what: str, default: float = 0.0) -> float:
    value = _optional_number(h, key, what, default)
    if not (math.isfinite(value) and value >= 0) and not (math.isnan(value) and math.isnan(default)):
        raise ProtocolError("malformed", f"{what} header field {key!r} must be a finite number >= 0")
    return value


@dataclass(frozen=True)
class RegionSum:
    """A relay's answer to one round of the root (``fedge relay``): the
    exact weighted sum of the updates its region's round counted, before
    anything is divided or noised (``aggregator.pipeline.Partial``), with its
    weight and counts. Identified by (job, round, relay, attempt) and folded
    at most once; ``partial_id`` names the region round that made it.

    ``body`` is the float32 sum (safetensors, the model's tensor names and
    shapes). A region whose round counted nothing sends no sum: it declines.
    """

    job: str
    round: int
    attempt: int  # the root's attempt it answers
    sender: str  # the relay
    partial_id: str
    base_model: str  # state digest of the global model the updates were trained from
    weight: float  # the mean's denominator: the sum of the updates' weights
    num_samples: int
    devices: int  # updates in the sum
    selected: int  # devices the region's round asked
    declined: int = 0
    late: int = 0
    rejected: int = 0
    loss: float = math.nan  # the devices' mean training loss, weighted as the sum is
    bound: float | None = None  # the norm bound the relay applied, if any
    clipped: int = 0
    capped: int = 0
    median_norm: float = math.nan
    median_samples: float = 0.0
    bits: float = 0.0  # adaptive clipping's reports, summed
    body: bytes = b""

    @property
    def update_id(self) -> str:
        """What its receipt names (``Ack.update_id``)."""
        return self.partial_id

    def encode(self) -> bytes:
        header = {
            "job": self.job, "round": self.round, "attempt": self.attempt, "sender": self.sender,
            "partial_id": self.partial_id, "base_model": self.base_model, "weight": self.weight,
            "num_samples": self.num_samples, "codec": None, "devices": self.devices, "selected": self.selected,
            "declined": self.declined, "late": self.late, "rejected": self.rejected,
            "loss": self.loss if math.isfinite(self.loss) else None, "bound": self.bound, "clipped": self.clipped,
            "capped": self.capped, "median_norm": self.median_norm if math.isfinite(self.median_norm) else None,
            "median_samples": self.median_samples, "bits": self.bits,
        }
        return wire.encode(Kind.PARTIAL, header, self.body)

    @classmethod
    def parse(cls, env: Envelope) -> RegionSum:
        h = _expect(env, Kind.PARTIAL)
        what = "region sum"
        weight = _non_negative(h, "weight", what)
        if not weight > 0:
            raise ProtocolError("malformed", "region sum header field 'weight' must be positive")
        bound = h.get("bound")
        partial_id = _field(h, "partial_id", str, what)
        if not 0 < len(partial_id) <= TASK_MAX or not partial_id.isprintable():
            raise ProtocolError("malformed", f"region sum 'partial_id' must be 1-{TASK_MAX} printable characters")
        return cls(
            job=_id(h, "job", what), round=_count(h, "round", what), attempt=_count(h, "attempt", what),
            sender=_id(h, "sender", what), partial_id=partial_id,
            base_model=_field(h, "base_model", str, what), weight=weight,
            num_samples=_count(h, "num_samples", what), devices=_count(h, "devices", what),
            selected=_count(h, "selected", what), declined=_count(h, "declined", what),
            late=_count(h, "late", what), rejected=_count(h, "rejected", what),
            loss=_optional_number(h, "loss", what, math.nan),
            bound=None if bound is None else _non_negative(h, "bound", what),
            clipped=_count(h, "clipped", what), capped=_count(h, "capped", what),
            median_norm=_non_negative(h, "median_norm", what, math.nan),
            median_samples=_non_negative(h, "median_samples", what), bits=_non_negative(h, "bits", what),
            body=env.body,
        )


MAX_KEY_LINKS = 64


@dataclass(frozen=True)
class KeyLink:
    """One rotation of the aggregator's key: ``old`` signed ``new`` (both
    ``ed25519:...`` text; ``signature`` base64url, see
    ``fedge.identity.link_digest``)."""

    old: str
    new: str
    signature: str


@dataclass(frozen=True)
class KeyChain:
    """Every rotation of the aggregator's key since the job began, oldest
    first, retained on the keys topic and signed by the current key: a
    device that pinned any earlier key walks it to the current one."""

    job: str
    links: tuple[KeyLink, ...]

    def encode(self) -> bytes:
        header = {"job": self.job, "sender": AGGREGATOR, "num_samples": 0, "codec": None,
                  "links": [{"old": k.old, "new": k.new, "signature": k.signature} for k in self.links]}
        return wire.encode(Kind.KEYS, header)

    @classmethod
    def parse(cls, env: Envelope) -> KeyChain:
        h = _expect(env, Kind.KEYS)
        raw = _field(h, "links", list, "key chain")
        if len(raw) > MAX_KEY_LINKS:
            raise ProtocolError("malformed", f"key chain has {len(raw)} links, over {MAX_KEY_LINKS}")
        links = []
        for item in raw:
            if not isinstance(item, dict):
                raise ProtocolError("malformed", "key chain link must be an object")
            links.append(KeyLink(old=_field(item, "old", str, "key link"), new=_field(item, "new", str, "key link"),
                                 signature=_field(item, "signature", str, "key link")))
        return cls(job=_id(h, "job", "key chain"), links=tuple(links))


@dataclass(frozen=True)
class Artifact:
    """A file derived from a global model for inference-only devices (an ONNX
    model, float or quantized), retained and chunked on
    ``fedge/v1/<job>/artifact/<name>/``. ``sha256`` is the file's own digest,
    the one its manifest names, checked by the device before it serves."""

    job: str
    round: int
    name: str
    format: str  # "onnx"
    variant: str  # "float32", "int8", "fp16"
    sha256: str
    manifest: dict[str, Any]
    body: bytes

    def encode(self) -> bytes:
        header = {"job": self.job, "round": self.round, "sender": AGGREGATOR, "num_samples": 0, "codec": None,
                  "name": self.name, "format": self.format, "variant": self.variant, "sha256": self.sha256,
                  "manifest": self.manifest}
        return wire.encode(Kind.ARTIFACT, header, self.body)

    @classmethod
    def parse(cls, env: Envelope) -> Artifact:
        import hashlib

        h = _expect(env, Kind.ARTIFACT)
        art = cls(
            job=_id(h, "job", "artifact"),
            round=_field(h, "round", int, "artifact"),
            name=_id(h, "name", "artifact"),
            format=_field(h, "format", str, "artifact"),
            variant=_field(h, "variant", str, "artifact"),
            sha256=_field(h, "sha256", str, "artifact"),
            manifest=_field(h, "manifest", dict, "artifact"),
            body=env.body,
        )
        if hashlib.sha256(art.body).hexdigest() != art.sha256:
            raise ProtocolError("checksum", "artifact body does not match its sha256")
        if art.manifest.get("sha256") not in (None, art.sha256):
            raise ProtocolError("checksum", "artifact manifest names another file")
        return art


MAX_SECAGG_DEVICES = SECAGG_MAX_DEVICES
# stage -> (who sends it, bytes per entry of ``ids``); see fedge.secagg
SECAGG_STAGES: dict[str, tuple[str, int]] = {
    "keys": ("device", 64),  # ids = (sender,): its encryption and mask public keys
    "keyset": ("aggregator", 64),  # peers = U1; ids = the recipient's neighbours, their keys
    "shares": ("device", SEALED_BYTES),  # ids = the neighbours each sealed share is for
    "routed": ("aggregator", SEALED_BYTES),  # peers = U2 (who shared); ids = who each sealed share is from
    "survivors": ("aggregator", 0),  # peers = U3 (who sent masked inputs)
    "reveal": ("device", 32),  # ids = whose share; kinds "b"/"s"; indices: the share's index
}


@dataclass(frozen=True)
class SecAggStage:
    """One stage of secure aggregation between the aggregator and one
    device (``client``) for one round attempt. Devices send theirs on their
    update topic, the aggregator on the device's ack topic; both are signed
    like every other message. What ``ids``, ``peers`` and the fixed-size
    entries of the body mean depends on ``stage`` (``SECAGG_STAGES``)."""

    job: str
    round: int
    attempt: int
    client: str
    stage: str
    ids: tuple[str, ...] = ()
    blobs: tuple[bytes, ...] = ()
    peers: tuple[str, ...] = ()
    kinds: str = ""  # reveal: "b" or "s" per id
    indices: tuple[int, ...] = ()  # reveal: the share's index per id

    def __post_init__(self) -> None:
        if self.stage not in SECAGG_STAGES:
            raise ProtocolError("malformed", f"secagg stage {self.stage!r} is not known")
        size = SECAGG_STAGES[self.stage][1]
        if len(self.ids) > MAX_SECAGG_DEVICES or len(self.peers) > MAX_SECAGG_DEVICES:
            raise ProtocolError("malformed", f"secagg {self.stage} names over {MAX_SECAGG_DEVICES} devices")
        if len(set(self.ids)) != len(self.ids) or len(set(self.peers)) != len(self.peers):
            raise ProtocolError("malformed", f"secagg {self.stage} names a device twice")
        if size and (len(self.blobs) != len(self.ids) or any(len(b) != size for b in self.blobs)):
            raise ProtocolError("malformed", f"secagg {self.stage} needs one {size}-byte entry per device")
        if not size and self.blobs:
            raise ProtocolError("malformed", f"secagg {self.stage} carries no entries")
        if self.stage == "reveal":
            if len(self.kinds) != len(self.ids) or set(self.kinds) - {"b", "s"} or len(self.indices) != len(self.ids):
                raise ProtocolError("malformed", "secagg reveal needs a kind (b or s) and an index per share")
            if any(not 1 <= i <= MAX_SECAGG_DEVICES for i in self.indices):
                raise ProtocolError("malformed", "secagg reveal share index out of range")
        elif self.kinds or self.indices:
            raise ProtocolError("malformed", f"secagg {self.stage} carries no kinds or indices")

    @property
    def sender(self) -> str:
        return self.client if SECAGG_STAGES[self.stage][0] == "device" else AGGREGATOR

    def encode(self) -> bytes:
        header: dict[str, Any] = {
            "job": self.job, "round": self.round, "attempt": self.attempt, "sender": self.sender,
            "client": self.client, "stage": self.stage, "ids": list(self.ids), "peers": list(self.peers),
            "num_samples": 0, "codec": None,
        }
        if self.stage == "reveal":
            header.update(kinds=self.kinds, indices=list(self.indices))
        return wire.encode(Kind.SECAGG, header, b"".join(self.blobs))

    @classmethod
    def parse(cls, env: Envelope) -> SecAggStage:
        h = _expect(env, Kind.SECAGG)
        stage = _field(h, "stage", str, "secagg")
        if stage not in SECAGG_STAGES:
            raise ProtocolError("malformed", f"secagg stage {stage!r} is not known")
        size = SECAGG_STAGES[stage][1]
        ids = _ids(h, "ids")
        body = env.body
        if len(body) != size * len(ids):
            raise ProtocolError("malformed", f"secagg {stage} body is {len(body)} bytes, not {size} x {len(ids)}")
        indices = h.get("indices", [])
        if not isinstance(indices, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
            raise ProtocolError("malformed", "secagg indices must be a list of integers")
        kinds = h.get("kinds", "")
        if not isinstance(kinds, str):
            raise ProtocolError("malformed", "secagg kinds must be a string")
        msg = cls(
            job=_id(h, "job", "secagg"), round=_field(h, "round", int, "secagg"),
            attempt=_field(h, "attempt", int, "secagg"), client=_id(h, "client", "secagg"), stage=stage,
            ids=ids, blobs=tuple(body[i * size:(i + 1) * size] for i in range(len(ids))) if size else (),
            peers=_ids(h, "peers"), kinds=kinds, indices=tuple(indices),
        )
        if h.get("sender") != msg.sender:
            raise ProtocolError("sender_mismatch", f"secagg {stage} must come from {msg.sender}")
        return msg


def _ids(h: dict[str, Any], key: str) -> tuple[str, ...]:
    raw = h.get(key, [])
    if not isinstance(raw, list) or len(raw) > MAX_SECAGG_DEVICES:
        raise ProtocolError("malformed", f"secagg {key} must be a list of at most {MAX_SECAGG_DEVICES} ids")
    out = []
    for value in raw:
        if not isinstance(value, str):
            raise ProtocolError("malformed", f"secagg {key} must hold device ids")
        try:
            out.append(check_id(value, f"secagg {key} entry"))
        except ValueError as exc:
            raise ProtocolError("malformed", str(exc)) from None
    return tuple(out)


def encode_event(job: str, record: dict[str, Any]) -> bytes:
    """A closed round's record, as JSON in the body: a round of thousands
    lists thousands of device ids, past the header's 64 KiB."""
    header = {"job": job, "round": record.get("round", 0), "sender": AGGREGATOR, "num_samples": 0, "codec": None}
    return wire.encode(Kind.EVENT, header, json.dumps(record, separators=(",", ":"), allow_nan=False).encode())


def parse_event(env: Envelope) -> dict[str, Any]:
    """The record of an event (in its body; in its header, from before)."""
    h = _expect(env, Kind.EVENT)
    if "record" in h:
        return _field(h, "record", dict, "event")
    try:
        record = json.loads(env.body)
    except ValueError as exc:
        raise ProtocolError("malformed", f"event record is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ProtocolError("malformed", "event record is not a JSON object")
    return record
