"""The round lifecycle: the phases a job's rounds go through and what moves
them, as data; and the timers each phase runs on.

Rules first. A job is in one phase at a time:

* ``waiting``: fewer eligible devices are online than a round needs.
* ``settling``: enough are; the round waits ``settle_s`` more before it
  selects, because presence arrives one retained message at a time after a
  (re)connect or a power cut, and selecting at once would pick the first few.
* ``open``: a round was announced to the devices it selected. It closes on
  the next tick once it is ``due`` (a quorum of them responded), once its
  ``grace`` ran out (only devices that went offline are still awaited), or
  at its ``deadline``, whichever comes first.
* ``unmasking``: a securely aggregated round stopped taking masked inputs
  and waits for the survivors' revealed shares (the secure stage's own
  deadline bounds it).
* ``closing``: the round's result is being computed, stepped and published;
  it ends within the event that began it, in ``waiting`` (the next round)
  or ``done``.
* ``done``: every round ran, or the privacy budget stopped the job.

``TRANSITIONS`` is every move there is; any other raises ``LifecycleError``
(a bug in the round core, never an input's doing). The round core
(``aggregator.rounds``) decides when to move; this module holds where it is
and when its next timer fires.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field

from fedge.errors import OneReasonError


class LifecycleError(OneReasonError):
    default_reason = "lifecycle"


class Phase(str, enum.Enum):
    WAITING = "waiting"
    SETTLING = "settling"
    OPEN = "open"
    UNMASKING = "unmasking"
    CLOSING = "closing"
    DONE = "done"

    @property
    def announced(self) -> str:
        """The state a round announcement says (``waiting``, ``open`` or
        ``done``): devices need no finer view."""
        if self in (Phase.WAITING, Phase.SETTLING):
            return "waiting"
        return "done" if self is Phase.DONE else "open"


class Trigger(str, enum.Enum):
    ENOUGH = "enough eligible devices are online"
    TOO_FEW = "too few eligible devices are online"
    ANNOUNCE = "a round is announced"
    INPUTS_CLOSED = "secure aggregation stops taking inputs"
    CLOSE = "the round closes"
    NEXT = "the round closed; the next one waits"
    FINISH = "the job is done"


P, T = Phase, Trigger
TRANSITIONS: dict[tuple[Phase, Trigger], Phase] = {
    (P.WAITING, T.TOO_FEW): P.WAITING,
    (P.WAITING, T.ENOUGH): P.SETTLING,
    (P.WAITING, T.ANNOUNCE): P.OPEN,  # no settling: right after a round, or a restarted round again
    (P.WAITING, T.FINISH): P.DONE,  # the last round ran (a job resumed at its end)
    (P.SETTLING, T.TOO_FEW): P.WAITING,
    (P.SETTLING, T.ANNOUNCE): P.OPEN,
    (P.SETTLING, T.FINISH): P.DONE,  # the privacy budget would be passed
    (P.OPEN, T.INPUTS_CLOSED): P.UNMASKING,
    (P.OPEN, T.CLOSE): P.CLOSING,
    (P.UNMASKING, T.CLOSE): P.CLOSING,
    (P.CLOSING, T.NEXT): P.WAITING,
}
del P, T


@dataclass
class Lifecycle:
    """Where the job's rounds are, and the timers of the phase."""

    phase: Phase = Phase.WAITING
    settle_until: float | None = None  # settling: select then
    deadline: float = math.inf  # open: close then, whatever arrived
    due: float | None = None  # open: a quorum responded at this time; close on the next tick
    grace_until: float | None = None  # open: only devices that went offline are awaited; close then
    closing: str | None = None  # unmasking: why the inputs closed (the round's closed_by)

    def move(self, trigger: Trigger) -> Phase:
        nxt = TRANSITIONS.get((self.phase, trigger))
        if nxt is None:
            raise LifecycleError(f"{trigger.value!r} cannot happen in phase {self.phase.value}")
        self.phase = nxt
        return nxt

    # --- waiting and settling ------------------------------------------------------

    def too_few(self) -> None:
        self.move(Trigger.TOO_FEW)
        self.settle_until = None

    def settled(self, now: float, settle_s: float) -> bool:
        """Enough devices are online: whether the round may select now
        (``settle_s`` after they first were)."""
        if self.phase is Phase.WAITING:
            self.move(Trigger.ENOUGH)
            self.settle_until = now + settle_s
        return self.settle_until is not None and now >= self.settle_until

    # --- an open round --------------------------------------------------------------

    def announce(self, now: float, deadline_s: float) -> None:
        self.move(Trigger.ANNOUNCE)
        self.settle_until, self.deadline = None, now + deadline_s
        self.due = self.grace_until = self.closing = None

    def mark_due(self, now: float) -> None:
        if self.due is None:
            self.due = now

    def await_offline(self, now: float, grace_s: float) -> None:
        """Only devices that went offline are awaited: close after a grace."""
        if self.grace_until is None:
            self.grace_until = now + grace_s

    def await_all(self) -> None:
        self.grace_until = None

    def expired(self, now: float) -> str | None:
        """Why an open round closes at ``now`` (``quorum`` or ``deadline``), or None."""
        if self.phase is not Phase.OPEN:
            return None
        if self.due is not None or (self.grace_until is not None and now >= self.grace_until):
            return "quorum"
        return "deadline" if now >= self.deadline else None

    def close_inputs(self, reason: str) -> None:
        self.move(Trigger.INPUTS_CLOSED)
        self.closing = reason

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        self.move(Trigger.CLOSE)

    def next_round(self) -> None:
        self.move(Trigger.NEXT)
        self.deadline, self.due, self.grace_until, self.closing = math.inf, None, None, None

    def finish(self) -> None:
        self.move(Trigger.FINISH)
        self.settle_until = None

    # --- timers ----------------------------------------------------------------------

    def next_deadline(self, stage_ends: float | None = None) -> float | None:
        """When the next timer fires; ``stage_ends``: when secure
        aggregation's current stage ends, if one is waited on."""
        if self.phase is Phase.UNMASKING:
            return stage_ends
        if self.phase is Phase.OPEN:
            if self.due is not None:
                return self.due
            at = self.deadline if self.grace_until is None else min(self.grace_until, self.deadline)
            return at if stage_ends is None else min(at, stage_ends)
        if self.phase is Phase.SETTLING:
            return self.settle_until
        return None


@dataclass
class OpenRound:
    """The round in progress: whom it selected and what they answered."""

    round: int
    attempt: int
    selected: tuple[str, ...]
    opened_at: float
    bytes_down: int
    accepted: dict[str, str] = field(default_factory=dict)  # client -> update id
    declined: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)  # selected, then went offline: no longer awaited
    refused: set[str] = field(default_factory=set)  # selected, sent an update refused for good
    rejected: Counter[str] = field(default_factory=Counter)
    late: int = 0
    bytes_up: int = 0
    num_samples: int = 0
    losses: dict[str, tuple[float, int]] = field(default_factory=dict)  # client -> (loss, samples)
    model_missing: int = 0  # devices that declined for lack of the announced model
    republished: bool = False  # the model was published again this attempt (a device lacked it)
    # ``selected`` as a set: asked for every update and presence of a round of thousands.
    members: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.members = frozenset(self.selected)
