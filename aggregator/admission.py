"""Whether a round may count an update: an ordered table of named checks.

Rules first. ``CHECKS`` lists the checks in the order they run; the first
that does not pass decides, and an update that passes them all goes on to
the round's aggregation (``aggregator.robust`` folds it, or secure
aggregation takes its masked input), which may still refuse it. A check
returns None (next check) or one of three verdicts:

* ``Refuse(reason, detail)``: counted under ``reason`` (the counters and
  receipt statuses are these reasons), logged, and answered with a
  ``rejected`` receipt (``late`` for the reason ``late``) when the update
  names itself and ``receipt`` is true;
* ``Duplicate``: a copy of an update the round (or a closed round) already
  counted: a ``duplicate`` receipt, never folded nor refused (a refusal
  would make the device take back an update that was counted);
* ``Drop(counter, detail)``: counted and logged, no receipt (a masked input
  for another attempt: worthless here, and its sender has moved on).

A check reads the round core (``Gate``) and changes nothing; what follows
from a verdict (the counters, receipts, a slow device's bench cleared) is
the core's. Order matters where two checks could both speak: identity
before everything, a closed round's duplicates before "late", this
round's duplicates before the checks of an update's content (a redelivered
copy of a counted update must hear "duplicate", whatever changed since).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from aggregator.lifecycle import Lifecycle, Phase

if TYPE_CHECKING:
    from aggregator.policy import RoundPolicy
    from aggregator.privacy import DpRound
    from aggregator.roster import Roster
    from aggregator.secure import SecureRound
    from fedge.messages import Update
    from fedge.records import RoundRecord

log = logging.getLogger("fedge.aggregator")


@dataclass(frozen=True)
class Refuse:
    reason: str
    detail: str
    receipt: bool = True  # the sender may be told (not when the update is not its own, or not this job's)
    alive: bool = False  # it shows a device that was benched for silence is there after all


@dataclass(frozen=True)
class Duplicate:
    round: int
    attempt: int
    detail: str
    alive: bool = False


@dataclass(frozen=True)
class Drop:
    counter: str
    detail: str


Verdict = Refuse | Duplicate | Drop


class OpenRound(Protocol):
    round: int
    attempt: int
    selected: tuple[str, ...]
    members: frozenset[str]  # selected, as a set
    accepted: dict[str, str]


class Gate(Protocol):
    """What the checks read of the round core."""

    job: str
    roster: Roster
    history: list[RoundRecord]
    policy: RoundPolicy
    codec_params: dict[str, Any]
    secure: SecureRound | None
    secure_failure: str
    round_dp: DpRound | None
    life: Lifecycle
    attempt: int
    mode: Any  # the mode's own checks read it (a buffered job's: Tasks)

    @property
    def open(self) -> OpenRound | None: ...

    @property
    def model_digest(self) -> str: ...


Check = Callable[["Gate", str, "Update"], "Verdict | None"]


# --- who sent it --------------------------------------------------------------


def _job(core: Gate, client: str, upd: Update) -> Verdict | None:
    if upd.job != core.job:
        return Refuse("wrong_job", f"update for job {upd.job!r}", receipt=False)
    return None


def _sender(core: Gate, client: str, upd: Update) -> Verdict | None:
    if upd.sender != client:
        return Refuse("sender_mismatch", f"header says {upd.sender!r}")
    return None


def _known(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    if client not in core.roster.known and (op is None or client not in op.members):
        return Refuse("unknown_sender", "client never announced itself")
    return None


# --- which round --------------------------------------------------------------


def _closed_round(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    if op is not None and upd.round >= op.round:
        return None
    counted = next((r for r in reversed(core.history) if r.round == upd.round and client in r.accepted), None)
    if counted is not None:
        # A resend of an update the closed round folded (its receipt was
        # lost): "late" would make the device take it back into its
        # residual, counting it twice.
        return Duplicate(counted.round, counted.attempt, f"round {counted.round} counted an update from this device",
                         alive=True)
    return Refuse("late", f"round {upd.round} is closed", alive=True)


def _future_round(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    assert op is not None
    if upd.round > op.round:
        return Refuse("future_round", f"round {upd.round} is not open (round {op.round} is)")
    return None


def _selected(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    assert op is not None
    if client not in op.members:
        return Refuse("not_selected", f"not selected for round {op.round}")
    return None


def _counted(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    assert op is not None
    if client in op.accepted:
        return Duplicate(op.round, op.attempt, f"already counted update {op.accepted[client]}")
    return None


# --- what it holds ------------------------------------------------------------


def _base_model(core: Gate, client: str, upd: Update) -> Verdict | None:
    if upd.base_model != core.model_digest:
        return Refuse("stale_base", "trained from another global model")
    return None


def _codec(core: Gate, client: str, upd: Update) -> Verdict | None:
    if upd.codec != core.codec_params:
        return Refuse("wrong_codec", f"codec {upd.codec} but the round asked {core.codec_params}")
    return None


def _samples(core: Gate, client: str, upd: Update) -> Verdict | None:
    if not 1 <= upd.num_samples <= core.policy.max_samples:
        return Refuse("bad_samples", f"num_samples={upd.num_samples} outside 1..{core.policy.max_samples}")
    return None


# --- what this round's aggregation needs --------------------------------------


def _secure_attempt(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    assert op is not None
    if core.secure is not None and upd.attempt != op.attempt:
        # Masked for another attempt of this round (delivered late across a
        # restart): worthless here, and its sender has moved on to this one.
        return Drop("secagg_stale_attempt", f"masked input for attempt {upd.attempt} of round {op.round} "
                    f"(attempt {op.attempt} is open)")
    return None


def _unmasking(core: Gate, client: str, upd: Update) -> Verdict | None:
    op = core.open
    assert op is not None
    if core.secure is not None and core.life.phase is not Phase.OPEN:
        return Refuse("late", "the round stopped taking masked inputs (unmasking)")
    return None


def _secure_started(core: Gate, client: str, upd: Update) -> Verdict | None:
    if core.policy.secagg is not None and core.secure is None:
        return Refuse("secagg_failed", f"secure aggregation could not start: {core.secure_failure}")
    return None


def _clip_bit(core: Gate, client: str, upd: Update) -> Verdict | None:
    dp = core.round_dp
    if core.secure is None and dp is not None and dp.bit_std > 0 and upd.clip_bit is None:
        return Refuse("missing_clip_bit", "this private round clips adaptively: the update must say whether it "
                      "was within the clip (clip_bit)")
    return None


CHECKS: tuple[tuple[str, Check], ...] = (
    ("job", _job),
    ("sender", _sender),
    ("known", _known),
    ("closed_round", _closed_round),  # every check below runs with a round open
    ("future_round", _future_round),
    ("selected", _selected),
    ("counted", _counted),
    ("base_model", _base_model),
    ("codec", _codec),
    ("samples", _samples),
    ("secure_attempt", _secure_attempt),
    ("unmasking", _unmasking),
    ("secure_started", _secure_started),
    ("clip_bit", _clip_bit),
)


# --- a buffered job (aggregator.modes.buffered) -------------------------------------


class Tasks(Protocol):
    """What the buffered checks read of a buffered job's mode."""

    max_staleness: int

    def counted_version(self, client: str, task: str) -> int | None:
        """The version ``client``'s update for ``task`` went into, if it was
        counted (its last in a published version, or the buffer's)."""

    def task_of(self, client: str) -> str | None:
        """The task ``client`` was asked for and has not answered."""

    def digest_of(self, version: int) -> str | None:
        """The model digest announced for ``version`` (None: not kept)."""


def _tasks(core: Gate) -> Tasks:
    return cast(Tasks, core.mode)  # a buffered job's mode (BufferedRounds)


def _task_counted(core: Gate, client: str, upd: Update) -> Verdict | None:
    version = _tasks(core).counted_version(client, upd.task) if upd.task else None
    if version is not None:
        # A resend of a counted update (its receipt was lost, or the
        # aggregator restarted): never folded twice, never refused.
        return Duplicate(upd.round, core.attempt, f"task {upd.task} was counted in version {version}", alive=True)
    return None


def _task(core: Gate, client: str, upd: Update) -> Verdict | None:
    asked = _tasks(core).task_of(client)
    if not upd.task or upd.task != asked:
        return Refuse("no_task", f"task {upd.task!r} is not one this device was asked for"
                      + ("" if asked is None else f" (it was asked for {asked!r})"), alive=True)
    return None


def _job_open(core: Gate, client: str, upd: Update) -> Verdict | None:
    return None if core.open is not None else Refuse("late", "the job is not open")


def _staleness(core: Gate, client: str, upd: Update) -> Verdict | None:
    open_ = core.open
    assert open_ is not None
    version, most = open_.round, _tasks(core).max_staleness
    if upd.round > version:
        return Refuse("future_round", f"version {upd.round} is not published (version {version} is being built)")
    if version - upd.round > most:
        return Refuse("late", f"trained from version {upd.round}, {version - upd.round} behind version {version} "
                      f"(buffered.max_staleness = {most})", alive=True)
    return None


def _version_model(core: Gate, client: str, upd: Update) -> Verdict | None:
    if upd.base_model != _tasks(core).digest_of(upd.round):
        return Refuse("stale_base", f"base model is not the one announced for version {upd.round}")
    return None


BUFFERED_CHECKS: tuple[tuple[str, Check], ...] = (
    ("job", _job),
    ("sender", _sender),
    ("known", _known),
    ("task_counted", _task_counted),  # a counted update's resend hears "duplicate", open or not
    ("open", _job_open),
    ("staleness", _staleness),  # before the task: a counted update too old to be kept hears "late"
    ("task", _task),
    ("version_model", _version_model),
    ("codec", _codec),
    ("samples", _samples),
)


def admit(core: Gate, client: str, upd: Update, checks: tuple[tuple[str, Check], ...] = CHECKS) -> Verdict | None:
    """The first verdict of ``checks`` (``CHECKS``; a buffered job's
    ``BUFFERED_CHECKS``) on ``upd`` from ``client``, or None: the round's
    aggregation may take it."""
    for _, check in checks:
        verdict = check(core, client, upd)
        if verdict is not None:
            return verdict
    return None
