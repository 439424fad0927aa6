"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022): fast
devices never wait for slow ones.

Rules first.

* **Tasks.** The aggregator keeps ``concurrency`` devices training: each
  gets an ``Invite`` naming a task (an id of its own) on its receipt topic,
  and a new device is invited whenever one answers, declines, goes offline
  or stays silent past ``selection.deadline_s`` (its task then no longer
  holds a place, but its update is still taken). A device has at most one
  task, and adds at most one update to a version: it is invited again once
  its update is in a published version.
* **Versions.** The announcement's ``round`` is the version being built,
  and its model the newest version. A device trains on the newest version
  it can build, and its update names that version (``round``) and the task.
  An update trained s versions ago (s = staleness) is folded on arrival,
  through the same defences as a round's, scaled by the staleness weight
  (``aggregator.staleness``); one trained more than ``max_staleness``
  versions ago is refused with a ``late`` receipt. Every ``buffer_size``
  updates the server optimizer steps on their mean and the next version is
  published: ``job.rounds`` counts versions. A version has no deadline: it
  waits for its buffer, and tasks keep being handed out.
* **Exactly once.** An update is counted once across versions: the tasks
  folded into each of the last ``max_staleness`` + 2 versions are kept
  (``counted``, checkpointed with
  every version), and a copy of it hears ``duplicate``. The tasks not yet
  in a published version (asked, or in the buffer) are saved after every
  change (``SaveRoundOpen``, not fsynced: safe against a killed process).
  A restart resumes from the last version's checkpoint with those tasks and
  the next ``attempt``: the devices whose updates were in the lost buffer
  send them again (their receipts were for the earlier attempt), and each
  is folded once. A published version is never lost: its checkpoint is
  written before it is published.

* **Privacy** (``privacy.mode = "central"``): every update is clipped on
  the device and again here and weighs one (its staleness weight, at most
  one, only shrinks it); each version adds Gaussian noise of
  ``noise_multiplier x clip`` to its sum and divides by ``buffer_size``. A
  device adds at most one update to a version. Devices are invited as they
  become available, which is no secret random sample: the accountant
  counts every version as a release of every device (``sampling_rate`` 1,
  no amplification), and the budget stops the job before a version that
  would pass it.

What this mode does not do: secure aggregation (a SecAgg+ cohort is fixed
before anyone trains; a buffer's is whoever finishes first), distributed
noise and adaptive clipping; ``AggregatorConfig.check`` refuses each in one
line.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator import admission
from aggregator.events import Action, ClientStatus, PublishAnnouncement, RoundState, SaveRoundOpen, SendAck
from aggregator.lifecycle import OpenRound, Phase
from aggregator.modes.base import RoundMode
from fedge.logs import fields
from fedge.messages import BUFFERED, Decline, Invite, SecAggStage, Update

if TYPE_CHECKING:
    from aggregator.pipeline import Combined
    from aggregator.rounds import RoundCore
    from aggregator.staleness import BufferedPolicy

log = logging.getLogger("fedge.aggregator")


@dataclass
class Task:
    """A training asked of one device."""

    id: str
    version: int  # the version being built when it was asked
    issued_at: float
    holds: bool = True  # it counts towards concurrency (not once expired or its device went offline)


def _saved_tasks(record: dict[str, Any], now: float) -> dict[str, Task]:
    """The tasks a restart resumes, from the saved record (``_tasks_record``):
    each with a fresh deadline, and a place only if it held one (the
    buffer's did not). An entry that is not [task, version, holds] is left
    out, and said."""
    saved = record.get("tasks")
    out: dict[str, Task] = {}
    for client, entry in (saved.items() if isinstance(saved, dict) else ()):
        if (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and isinstance(entry[2], bool)):
            out[str(client)] = Task(entry[0], entry[1], now, holds=entry[2])
        else:
            log.warning("left out a saved task of %s that is not [task, version, holds]: %r", client, entry,
                        extra=fields(device=str(client), reason="bad_saved_task"))
    return out


class BufferedRounds(RoundMode):
    """The versions of a buffered job (see the module's docstring)."""

    checks = admission.BUFFERED_CHECKS

    def __init__(self, core: RoundCore, policy: BufferedPolicy) -> None:
        super().__init__(core)
        self.policy = policy
        self.max_staleness = policy.max_staleness
        self.tasks: dict[str, Task] = {}  # asked and not answered
        self.in_buffer: dict[str, tuple[str, int]] = {}  # client -> (task, staleness) of the buffer's updates
        # version -> {client: task} of the updates it folded, for the versions an update may still come from.
        self.counted: dict[int, dict[str, str]] = {}
        self.digests: dict[int, str] = {}  # version -> the model announced for it (the last max_staleness + 1)
        self.issued = 0  # tasks asked since the job began
        self.declined_at: dict[str, float] = {}  # a device that declined is not asked again for deadline_s
        self.waiting_announced = 0
        self.version_stats: Counter[str] = Counter()  # this version's tasks issued, expired, declined
        self.staleness_seen: Counter[int] = Counter()  # this version's updates by staleness
        self.staleness_total: Counter[int] = Counter()  # every update folded since the start, by staleness
        self.folded: dict[str, str] = {}  # client -> task of the version being closed

    # --- what the round core and admission read ----------------------------------------

    def counted_version(self, client: str, task: str) -> int | None:
        buffered = self.in_buffer.get(client)
        if buffered is not None and buffered[0] == task and self.core.open is not None:
            return self.core.open.round
        return next((v for v, folded in self.counted.items() if folded.get(client) == task), None)

    def task_of(self, client: str) -> str | None:
        task = self.tasks.get(client)
        return None if task is None else task.id

    def digest_of(self, version: int) -> str | None:
        return self.digests.get(version)

    def weight(self, upd: Update) -> float:
        op = self.core.open
        return self.policy.weight(0 if op is None else op.round - upd.round)

    def announced(self) -> dict[str, Any]:
        """The announcement's fields of this mode (and, as a pipeline stage: none)."""
        return {}

    def announcement_fields(self) -> dict[str, Any]:
        return {"mode": BUFFERED, "max_staleness": self.max_staleness}

    def expects_update_from(self, client: str) -> bool:
        if client in self.tasks or client in self.in_buffer:
            return True
        return any(client in folded for folded in self.counted.values())  # a resend hears "duplicate"

    def figures(self) -> dict[str, Any]:
        """What the metrics show of this mode (``aggregator.metrics``)."""
        op = self.core.open
        return {"concurrency": self.policy.concurrency, "training": self.active(),
                "buffer": 0 if op is None else len(op.accepted), "staleness": dict(self.staleness_total)}

    def active(self) -> int:
        """Tasks holding a place: devices training now, as far as we know."""
        return sum(1 for t in self.tasks.values() if t.holds)

    def next_deadline(self, stage_ends: float | None) -> float | None:
        c = self.core
        if c.life.phase is Phase.OPEN:
            if c.life.due is not None:
                return c.life.due
            ends = [t.issued_at + c.policy.deadline_s for t in self.tasks.values() if t.holds]
            ends += [at + c.policy.deadline_s for at in self.declined_at.values()]
            return min(ends) if ends else None
        return c.life.next_deadline(None)

    # --- events -----------------------------------------------------------------------

    def start(self, now: float, restored: dict[str, Any] | None) -> list[Action]:
        """Resume the tasks a restart interrupted (the buffer's included:
        their devices send their updates again), or open the first version."""
        c = self.core
        if not restored or restored.get("mode") != BUFFERED:
            return self.try_open(now)
        for client, task in _saved_tasks(restored, now).items():
            if self.counted_version(client, task.id) is None:
                self.tasks[client] = task
        c.roster.known.update(self.tasks)
        self.issued = max(self.issued, int(restored.get("issued", 0)))
        if c.next_round > c.policy.rounds:
            return self.finish_job(now)
        return self.announce(now, max(int(restored.get("attempt", 0)) + 1, c.attempt)) + self.reinvite()

    def on_status(self, ev: ClientStatus) -> list[Action]:
        c = self.core
        task = self.tasks.get(ev.client)
        actions: list[Action] = []
        if task is not None:
            if ev.online:
                actions = self._invite(ev.client, task)  # in case the invitation was lost
            elif task.holds:
                task.holds = False  # gone: its place goes to another; its update is still taken
        if c.state == RoundState.WAITING:
            return self.try_open(ev.now)
        return actions + self.top_up(ev.now)

    def on_timer(self, now: float) -> list[Action]:
        c = self.core
        if c.life.phase is Phase.OPEN and c.life.due is not None:
            return self.close(now, "buffer_full")
        if c.state == RoundState.WAITING:
            return self.try_open(now)
        if c.life.phase is not Phase.OPEN:
            return []
        expired = [client for client, t in self.tasks.items()
                   if t.holds and now - t.issued_at >= c.policy.deadline_s]
        for client in expired:
            self.tasks[client].holds = False
            self.version_stats["tasks_expired"] += 1
            c.counters["task_expired"] += 1
            c.roster.strike(client, c.next_round)  # benched for silence, like a round's silent device
        rested = [d for d, at in self.declined_at.items() if now - at >= c.policy.deadline_s]
        for client in rested:
            del self.declined_at[client]
        return self.top_up(now) if expired or rested else []

    def on_secagg(self, client: str, msg: SecAggStage, now: float) -> list[Action]:
        self.core.counters["secagg_late"] += 1  # no secure aggregation here (refused by the config)
        return []

    def check_quorum(self, now: float) -> None:
        c = self.core
        if c.open is not None and len(c.open.accepted) >= self.policy.buffer_size:
            c.life.mark_due(now)  # stepped on the next tick: the last receipt leaves first

    def accepted(self, client: str, upd: Update, now: float) -> list[Action]:
        c = self.core
        op = c.open
        assert op is not None
        task = self.tasks.pop(client)
        staleness = op.round - upd.round
        self.in_buffer[client] = (task.id, staleness)
        self.staleness_seen[staleness] += 1
        self.staleness_total[staleness] += 1
        c.roster.alive(client)
        self.check_quorum(now)
        return self.top_up(now, saved=True)

    def refused(self, client: str, upd: Update, status: str, now: float) -> list[Action]:
        task = self.tasks.get(client)
        if task is None or upd.task != task.id:
            return []
        del self.tasks[client]  # its device was told: it will not send another for this task
        return self.top_up(now, saved=True)

    def takes_decline(self, client: str, dec: Decline) -> bool:
        """A decline of the device's task (one naming none: of whatever it was asked)."""
        task = self.tasks.get(client)
        return task is not None and dec.task in ("", task.id)

    def declined(self, client: str, now: float) -> list[Action]:
        del self.tasks[client]
        self.declined_at[client] = now  # (out of memory, no data, too slow: asked at once, it would decline again)
        self.version_stats["tasks_declined"] += 1
        if self.core.open is not None:
            self.core.open.declined.add(client)
        return self.top_up(now, saved=True)

    def reinvite(self) -> list[Action]:
        """Every outstanding task's invitation again (a broker that lost them)."""
        actions: list[Action] = []
        for client, task in self.tasks.items():
            actions += self._invite(client, task)
        return actions

    # --- versions -----------------------------------------------------------------------

    def needed(self) -> int:
        """Eligible devices the first version waits for: enough to fill a buffer."""
        return max(super().needed(), self.policy.buffer_size)

    def try_open(self, now: float, settle: bool = True) -> list[Action]:
        c = self.core
        if c.next_round > c.policy.rounds:
            return self.finish_job(now)
        stop = self.budget_stop(now, "version")
        if stop is not None:
            return stop
        if settle:  # the first version: wait for a fleet that can fill a buffer, as a round waits
            needed = self.needed()
            count = c.roster.eligible_count(self.codecs(), c.next_round, needed)
            if count < needed:
                c.life.too_few()
                if self.waiting_announced != c.next_round:
                    self.waiting_announced = c.next_round
                    log.info("version %d waits for %d eligible devices online (%d now): buffered.buffer_size "
                             "updates from different devices make a version", c.next_round, needed, count)
                    return [PublishAnnouncement(c.announcement(RoundState.WAITING, (), now))]
                return []
            if c.policy.settle_s > 0 and not c.life.settled(now, c.policy.settle_s):
                return []
        return self.announce(now, max(c.attempt, 1))

    def announce(self, now: float, attempt: int) -> list[Action]:
        """Open the next version: announced with the newest model; the tasks
        asked go on, and free places are filled."""
        c = self.core
        c.attempt = attempt
        # A private version: every update clipped and weighing one, noise on the sum, divided by buffer_size.
        c.round_dp = c.private.open() if c.private is not None else None
        c.secure, c.secure_failure = None, ""
        version = c.next_round
        self.digests[version] = c.model_digest
        for old in [v for v in self.digests if v < version - self.max_staleness]:
            del self.digests[old]
        self.version_stats, self.staleness_seen = Counter(), Counter()
        msg = c.announcement(RoundState.OPEN, (), now)
        c.open = OpenRound(round=version, attempt=attempt, selected=(), opened_at=now,
                           bytes_down=c.published_bytes + len(msg) * len(c.roster.online))
        c.defence_history.begin(c.updates, c.round_dp)
        c.life.announce(now, math.inf)  # a version waits for its buffer, however long
        return [PublishAnnouncement(msg), *self.top_up(now, saved=True)]

    def close(self, now: float, reason: str) -> list[Action]:
        """Step on the buffer: its updates are in this version now, counted
        for good (a failed step drops them, as a failed round does), and
        their devices may be asked again."""
        op = self.core.open
        assert op is not None
        self.folded = {client: task for client, (task, _) in self.in_buffer.items()}  # for the version's record
        for client, task in self.folded.items():
            self.counted.setdefault(op.round, {})[client] = task
        for old in [v for v in self.counted if v < op.round - self.max_staleness - 1]:
            del self.counted[old]  # an update of an older version is too stale: refused before its task is asked
        self.in_buffer.clear()
        return super().close(now, reason)

    def round_extra(self, op: OpenRound) -> dict[str, Any]:
        seen = self.staleness_seen
        values = sorted(seen.elements())
        return {"buffered": {
            "version": op.round, "buffer_size": self.policy.buffer_size, "concurrency": self.policy.concurrency,
            "training": self.active(), "staleness": {str(s): n for s, n in sorted(seen.items())},
            "staleness_mean": round(float(np.mean(values)), 3) if values else None,
            "staleness_max": values[-1] if values else None,
            "tasks": dict(sorted(self.folded.items())),  # whose update, for which task: each is in one version
            **{k: v for k, v in sorted(self.version_stats.items())},
        }}

    # --- tasks ------------------------------------------------------------------------

    def top_up(self, now: float, saved: bool = False) -> list[Action]:
        """Invite devices until ``concurrency`` tasks hold places (idle,
        eligible devices, chosen at random); then save the tasks when they
        changed (or ``saved``: they changed already)."""
        c = self.core
        actions: list[Action] = []
        free = self.policy.concurrency - self.active()
        if free > 0 and c.open is not None and c.life.phase is Phase.OPEN:
            for client in self._pick(free):
                self.issued += 1
                task = self.tasks[client] = Task(c.new_id()[:16], c.next_round, now)
                self.version_stats["tasks_issued"] += 1
                actions += self._invite(client, task)
        if actions or saved:
            # Saved before the invitations leave: a device never trains for a task a restart would not know.
            actions.insert(0, SaveRoundOpen(self._tasks_record(), durable=False))
        return actions

    def _pick(self, k: int) -> list[str]:
        """Up to ``k`` idle, eligible devices at random (seeded): a few
        random draws in a large fleet (an update must not cost a scan of
        10,000 devices); else every idle one, the benched (silent on a
        task) filling in last, as in a round."""
        c = self.core
        able = c.roster.sorted_able(self.codecs())
        rng = random.Random(f"{c.policy.seed}/{c.next_round}/{self.issued}")

        def idle(d: str) -> bool:
            return d not in self.tasks and d not in self.in_buffer and d not in self.declined_at

        def ready(d: str) -> bool:
            return c.roster.benched.get(d, (0, 0))[1] <= c.next_round

        picked: list[str] = []
        tried: set[str] = set()
        for _ in range(4 * k + 8):
            if len(picked) == k or len(tried) == len(able):
                break
            d = able[rng.randrange(len(able))]
            if d not in tried:
                tried.add(d)
                if idle(d) and ready(d):
                    picked.append(d)
        if len(picked) < k:
            chosen = set(picked)
            rest = [d for d in able if d not in chosen and idle(d)]
            for group in ([d for d in rest if ready(d)], [d for d in rest if not ready(d)]):
                picked += rng.sample(group, min(k - len(picked), len(group)))
        return picked

    def _invite(self, client: str, task: Task) -> list[Action]:
        c = self.core
        if c.open is None:
            return []
        invite = Invite(c.job, c.next_round, c.attempt, client, c.model_digest, task=task.id)
        return [SendAck(client, invite.encode())]

    def _tasks_record(self) -> dict[str, Any]:
        """What a restart needs of the tasks not yet in a published version."""
        c = self.core
        tasks = {client: [t.id, t.version, t.holds] for client, t in self.tasks.items()}
        tasks.update({client: [task, c.next_round, False] for client, (task, _) in self.in_buffer.items()})
        return {"mode": BUFFERED, "round": c.next_round, "attempt": c.attempt, "model_digest": c.model_digest,
                "issued": self.issued, "tasks": tasks}

    # --- the pipeline stage's interface (checkpointed with every version) -----------------

    def recorded(self, combined: Combined | None) -> dict[str, Any]:
        return {}  # round_extra has the version's figures

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {"buffered": {"counted": {str(v): folded for v, folded in self.counted.items()},
                                 "digests": {str(v): d for v, d in self.digests.items()}, "issued": self.issued,
                                 "attempt": self.core.attempt}}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        saved = meta.get("buffered") or {}
        self.counted = {int(v): {str(c): str(t) for c, t in dict(folded).items()}
                        for v, folded in dict(saved.get("counted", {})).items()}
        self.digests = {int(v): str(d) for v, d in saved.get("digests", {}).items()}
        self.issued = int(saved.get("issued", 0))
        # Whatever starts next is a new attempt: receipts of the last one do not stop a resend.
        self.core.attempt = int(saved.get("attempt", 0)) + 1
        log.debug("buffered: versions %s counted, %s kept", sorted(self.counted), sorted(self.digests),
                  extra=fields(reason="restored"))
