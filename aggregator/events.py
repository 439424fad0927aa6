"""The round core's interface: the events a shell feeds it and the actions
it returns (``aggregator.rounds.RoundCore.handle``). Nothing here does I/O:
the shell (``aggregator.service``) turns broker messages and clock ticks
into events and carries out the actions, in order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.records import RoundRecord
from fedge.tensors import ModelArrays
from fedge.wire import Envelope


class RoundState(str, enum.Enum):
    """What a round announcement says of the job (``aggregator.lifecycle``
    has the finer phases)."""

    WAITING = "waiting"
    OPEN = "open"
    DONE = "done"


# --- events ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientStatus:
    client: str
    online: bool
    info: dict[str, Any]
    now: float


@dataclass(frozen=True)
class MessageArrived:
    """A whole (reassembled) message from ``fedge/v1/<job>/update/<client>``;
    ``envelope``: the same bytes, already decoded by the shell (which checks
    a signature before it charges the device's rate), so the body is not
    hashed twice."""

    client: str
    message: bytes
    now: float
    envelope: Envelope | None = None


@dataclass(frozen=True)
class TimerFired:
    now: float


@dataclass(frozen=True)
class Incident:
    """Something the shell saw go wrong that the job's counters must show: a
    chunk it dropped, a presence it could not parse, an export that failed."""

    reason: str
    client: str | None
    now: float


@dataclass(frozen=True)
class FromRoot:
    """A relay heard its root (``aggregator.modes.relay``): the root's
    announcement, or its receipt for the region's sum; the signature, if
    the job signs, was checked against the root's key."""

    envelope: Envelope
    now: float


Event = ClientStatus | MessageArrived | TimerFired | Incident | FromRoot

# --- actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class PublishModel:
    message: bytes  # a key model (GlobalModel envelope); the shell chunks it, retained


@dataclass(frozen=True)
class PublishDelta:
    message: bytes | None  # a ModelDelta envelope, retained; None clears the retained delta


@dataclass(frozen=True)
class PublishAnnouncement:
    message: bytes  # RoundAnnouncement envelope, retained


@dataclass(frozen=True)
class SendAck:
    client: str
    message: bytes
    receipt: str = ""  # for an update's receipt: its status, and the reason of a refusal ("rejected: stale_base")
    round: int = 0  # the receipt's round


@dataclass(frozen=True)
class SendToRoot:
    """A relay's message for its root: its region's sum of a round, or a
    decline when its region could not make one; the shell signs and sends
    it on the relay's update channel at the job's level."""

    message: bytes
    round: int


@dataclass(frozen=True)
class SaveCheckpoint:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


@dataclass(frozen=True)
class SaveRoundOpen:
    record: dict[str, Any]
    # False: safe against a killed process, not a power cut (no fsync): a
    # buffered job saves its tasks after every update.
    durable: bool = True


@dataclass(frozen=True)
class RoundFinished:
    """A round closed (ok or failed). ``record`` is what it did, without the
    evaluation the shell adds; ``model`` is the global model after it."""

    record: RoundRecord
    model: ModelArrays
    last: bool


Action = (PublishModel | PublishDelta | PublishAnnouncement | SendAck | SendToRoot | SaveCheckpoint | SaveRoundOpen
          | RoundFinished)
