"""A simulated fleet in one process: ``SimulatedFleet``.

It is the agent's own runtime (``AgentRuntime``: the same cores, state
directories, signing and MQTT code a real device runs) for many devices,
each with its own MQTT connection and identity, with what a lab hides put
back in, per device, from a fleet profile (``edge_agent.sim.profiles``):

- **links**: every connection is driven by one ``MqttLoop`` (epoll: no
  ``select()`` cap) and shaped by the device's uplink and downlink rates
  (token buckets) and its one-way latency;
- **compute**: devices that start from the same model train together in
  one batched request to a shared worker (``TRAIN_BATCH``: the update each
  would compute alone); each device's result is then held back until
  ``speed`` x the time that device would take alone on this host has passed
  since the request, so a device 8x slower than this host answers 8x later;
- **availability**: online and offline sessions drawn from the profile; a
  device going offline loses its connection without a DISCONNECT (the
  broker publishes its will) and keeps its state; what it publishes while
  away is queued and sent when it is back, as on a real device;
- **failures**: a crash during training loses the result and restarts the
  device from its state directory ``restart_s`` later; a connection lost
  during an upload is cut while the update is being sent (paho sends it
  again on the next connection).

Time: ``time_scale`` k runs fleet time k times faster than wall time: rates
are multiplied by k and latencies, compute delays and sessions divided by
k. The aggregator's own timers (round deadline, settle time) are not
touched: scale them in its config. Every result states k.

Devices that receive the same model bytes decode them once
(``ModelMemo``): 10,000 devices hold one copy of the global model, and each
still receives, verifies and acts on its own copy of every message.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.core import Action, PublishUpdate, StartTraining, TrainJob
from edge_agent.inference import InstallArtifact
from edge_agent.pool import Outcome, TrainingPool
from edge_agent.runtime import AgentRuntime, DeviceSpec, _Device, _Trained
from edge_agent.sim.profiles import Availability, DeviceConditions, Profile
from fedge import wire
from fedge.config import BrokerSettings
from fedge.mqtt import Inbound, LinkDown, LinkUp, MqttLink, monotonic
from fedge.mqtt_loop import MqttLoop, Shaping
from fedge.transport import Sink
from fedge.wire import Kind

log = logging.getLogger("fedge.sim")

BATCH_WINDOW_S = 0.2  # training requests are gathered this long at most before a batch goes out
MAX_BATCH = 512  # devices in one batched request
# What a batched request's list of devices may take of its header (whose
# limit is ``wire.MAX_HEADER_BYTES``): a batch is cut where its list would
# pass it (long data paths and arguments make fewer devices a batch).
BATCH_HEADER_BUDGET = wire.MAX_HEADER_BYTES - 8192  # the rest: model, model arguments, plan
TICK_S = 1.0  # the cores' timers (resends, model waits): often enough for a fleet


@dataclass
class _Held:
    """A device's training result, held until its simulated training time has passed."""

    item: _Trained


class SimulatedFleet(AgentRuntime):
    """Devices ``specs`` with their drawn ``conditions`` (by client id) on
    one ``loop``; training on ``pool`` (which must offer ``submit_batch``)."""

    def __init__(self, specs: list[DeviceSpec], conditions: dict[str, DeviceConditions], broker: BrokerSettings,
                 pool: TrainingPool, profile: Profile, *, loop: MqttLoop, time_scale: float = 1.0, seed: int = 0,
                 fleet_start: float | None = None, shared_files: Path | None = None) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.loop = loop
        self.profile = profile
        self.conditions = conditions
        self.time_scale = time_scale
        self.seed = seed
        self.closing = False
        self.loop_counts: dict[str, int] = {}  # the loop's, as the fleet stopped
        self.raw: dict[str, MqttLink] = {}  # each device's own link (under the CountingLink)
        loop.reserve(len(specs))  # too few descriptors: one line now, before anything starts
        super().__init__(specs, broker, pool, tick_s=TICK_S, link_factory=self._link, shared_models=True,
                         shared_files=shared_files)
        self.t0 = monotonic() if fleet_start is None else fleet_start
        self.rng = {cid: random.Random(f"{seed}/{cid}/events") for cid in self.devices}
        self.availability = {
            cid: Availability(profile.group(conditions[cid].group), random.Random(f"{seed}/{cid}/availability"))
            for cid in self.devices
        }
        self.online: set[str] = set()  # on the network now (by the availability schedule, and not crashed)
        self.started: set[str] = set()  # links started at least once
        self.crashed: set[str] = set()
        self._timers: list[tuple[float, int, str, Any]] = []  # (wall time, seq, what, payload)
        self._seq = itertools.count()
        self._pending: list[tuple[_Device, TrainJob, float]] = []  # training requests not yet sent
        self._submitted: dict[tuple[str, str], float] = {}  # (device, training id) -> when requested
        self.stats: Counter[str] = Counter()
        self.updates_sent: Counter[str] = Counter()  # by device

    # --- links ---------------------------------------------------------------------

    def _link(self, settings: Any, client_id: str, sink: Sink, *, subscriptions: Iterable[str] = (),
              will: tuple[str, bytes] | None = None, persistent: bool = True, name: str | None = None) -> MqttLink:
        c = self.conditions[client_id]
        k = self.time_scale
        shaping = Shaping(up_bytes_s=c.uplink_bytes_s * k, down_bytes_s=c.downlink_bytes_s * k,
                          delay_s=c.latency_s / k)

        def put(item: LinkUp | LinkDown | Inbound) -> None:
            if not self.closing:  # at close the runtime stops reading: never block the loop on it
                sink(item)

        link = MqttLink(settings, client_id, put, subscriptions=subscriptions, will=will, persistent=persistent,
                        name=name, loop=self.loop, shaping=shaping)
        self.raw[client_id] = link
        return link

    def fleet_time(self, now: float) -> float:
        return (now - self.t0) * self.time_scale

    def _at(self, fleet_delay_s: float, now: float, what: str, payload: Any) -> None:
        heapq.heappush(self._timers, (now + max(0.0, fleet_delay_s) / self.time_scale, next(self._seq), what, payload))

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        now = monotonic()
        for cid in self.devices:
            avail = self.availability[cid]
            if avail.online:
                self._go_online(cid, now)
            self._schedule_availability(cid, now)

    def _schedule_availability(self, cid: str, now: float) -> None:
        change = self.availability[cid].next_change(self.fleet_time(now))
        if change is not None:
            self._at(change - self.fleet_time(now), now, "availability", cid)

    def _go_online(self, cid: str, now: float) -> None:
        self.online.add(cid)
        if cid in self.crashed:
            return  # back when its restart is done
        if cid not in self.started:
            self.started.add(cid)
            self.devices[cid].link.start()
        else:
            self.loop.resume(self.raw[cid])

    def _go_offline(self, cid: str) -> None:
        self.online.discard(cid)
        if cid in self.started and cid not in self.crashed:
            self.loop.suspend(self.raw[cid])

    def close(self) -> None:
        """Stop every device, all at once: each connected one says it is
        offline (as ``fedge agent`` does on SIGTERM), then disconnects."""
        self.closing = True
        self.loop_counts = {"attempts": self.loop.attempts, "accepted": self.loop.accepted, "drops": self.loop.drops}
        while self.inbox.get(timeout=0) is not None:  # a network thread waiting on a full inbox goes on
            pass
        for cid, dev in self.devices.items():
            if cid in self.online and cid not in self.crashed and dev.link.connected.is_set():
                dev.link.publish(dev.topics.status(cid), dev.presence(dev.core.status("offline")), retain=True)
        self.loop.close(timeout=5.0)

    def summary(self) -> dict[str, Any]:
        never = sum(1 for cid in self.devices if not self.updates_sent[cid])
        return {
            "devices": len(self.devices),
            "time_scale": self.time_scale,
            "counts": dict(sorted(self.stats.items())),
            "devices_that_never_sent_an_update": never,
            "updates_sent": sum(self.updates_sent.values()),
            "internal_errors": sum(self.failures.values()),
            "subscriptions_refused": sum(getattr(raw, "subscribe_refused", 0) for raw in self.raw.values()),
            "model_memo": {"hits": self.memo.hits, "misses": self.memo.misses} if self.memo else None,
            "loop": self.loop_counts,
            "groups": Counter(c.group for c in self.conditions.values() if c is not None),
            # MQTT payload bytes the devices sent ("out") and received ("in"), by channel
            "payload_bytes": {f"{d}_{ch}": n for (d, ch), n in sorted(self.bytes_by_channel.bytes.items())},
        }

    # --- the run loop's timers -----------------------------------------------------

    def _idle(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, what, payload = heapq.heappop(self._timers)
            try:
                self._fire(what, payload, now)
            except Exception as exc:  # a simulation bug must not stop the other devices
                self._contained(str(payload if isinstance(payload, str) else "fleet"), exc, what)
        if self._pending and (not len(self.inbox) or now - self._pending[0][2] >= BATCH_WINDOW_S):
            try:
                self._send_batches(now)
            except Exception as exc:  # counted; those devices' rounds go unanswered, the fleet goes on
                self._pending = []
                self._contained("fleet", exc, "a training batch")

    def _fire(self, what: str, payload: Any, now: float) -> None:
        if what == "availability":
            cid = payload
            was = self.availability[cid].online
            online = self.availability[cid].advance(self.fleet_time(now))
            if online and not was:
                self.stats["came_online"] += 1
                self._go_online(cid, now)
            elif was and not online:
                self.stats["went_offline"] += 1
                self._go_offline(cid)
            self._schedule_availability(cid, now)
        elif what == "deliver":
            self._deliver(payload, now)
        elif what == "restart":
            self._restart(payload, now)

    # --- training ------------------------------------------------------------------

    def _act(self, dev: _Device, action: Action | InstallArtifact) -> None:
        if isinstance(action, StartTraining):
            self._pending.append((dev, action.job, monotonic()))
            return
        super()._act(dev, action)
        if isinstance(action, PublishUpdate):
            cid = dev.spec.client_id
            self.updates_sent[cid] += 1
            if self.rng[cid].random() < self.conditions[cid].drop_in_upload:
                self.stats["connection_lost_in_upload"] += 1
                self.loop.drop(self.raw[cid])

    def _send_batches(self, now: float) -> None:
        groups: dict[tuple[str, str, str, str], list[tuple[_Device, TrainJob]]] = {}
        for dev, job, _ in self._pending:
            key = (job.model, json.dumps(job.model_args, sort_keys=True), json.dumps(job.plan.to_json(),
                   sort_keys=True), job.base_model)
            groups.setdefault(key, []).append((dev, job))
        self._pending = []
        for members in groups.values():
            for batch in _batches(members):
                self._submit(batch, now)

    def _submit(self, batch: list[tuple[_Member, dict[str, Any]]], now: float) -> None:
        members = [m for m, _ in batch]
        first = members[0][1]
        header = {"model": first.model, "model_args": first.model_args, "plan": first.plan.to_json(),
                  "items": [item for _, item in batch]}
        who = [(d.spec.client_id, j.job_id) for d, j in members]
        try:
            request = wire.encode(Kind.TRAIN_BATCH, header, first.model_body)
        except ValueError as exc:  # a header the budget misjudged: these devices' training fails, counted
            self.stats["training_batches_failed"] += 1
            self._contained("fleet", exc, "a training batch")
            for cid, job_id in who:  # at once, on this thread (its own inbox could be full)
                self._hold(_Trained(cid, job_id, Outcome(None, f"batch not sent: {exc}")), now)
            return
        for w in who:
            self._submitted[w] = now
        self.stats["training_batches"] += 1
        self.stats["trainings_requested"] += len(members)

        def done(i: int, outcome: Outcome) -> None:
            if self.closing:  # nobody reads the inbox any more: a pool thread must not wait on it
                return
            cid, job_id = who[i]
            self.inbox.put(_Held(_Trained(cid, job_id, outcome)))

        self.pool.submit_batch(request, len(members), done)

    def _dispatch(self, item: object, now: float) -> None:
        if isinstance(item, _Held):
            self._hold(item.item, now)
            return
        cid = getattr(item, "link", None)
        if cid in self.crashed:
            return  # a crashed device hears nothing until it restarts
        if isinstance(item, LinkDown) and cid not in self.online:
            self.connected.discard(cid)  # taken off the network by its schedule: not worth a warning
            return
        if isinstance(item, LinkUp):
            self.stats["connections"] += 1
        super()._dispatch(item, now)

    def _hold(self, item: _Trained, now: float) -> None:
        """Hold a result until the device's simulated training time has passed."""
        asked = self._submitted.pop((item.client_id, item.job_id), now)
        env = item.outcome.result
        c = self.conditions[item.client_id]
        reference = env.header.get("reference_seconds") if env is not None else None
        if isinstance(reference, (int, float)) and not isinstance(reference, bool) and reference > 0:
            due = asked + c.speed * float(reference) / self.time_scale
            if due > now:
                heapq.heappush(self._timers, (due, next(self._seq), "deliver", item))
                return
        self._deliver(item, now)

    def _deliver(self, item: _Trained, now: float) -> None:
        cid = item.client_id
        if cid in self.crashed:
            return
        if item.outcome.result is not None:
            self.stats["trained"] += 1
            if self.rng[cid].random() < self.conditions[cid].crash_in_training:
                self._crash(cid, now)
                return
        else:
            self.stats["training_failed"] += 1
        super()._dispatch(item, now)

    # --- crashes -------------------------------------------------------------------

    def _crash(self, cid: str, now: float) -> None:
        """The device's process dies mid-training: its connection goes (the
        broker publishes its will), its result is lost; it restarts from its
        state directory later."""
        self.stats["crashed_in_training"] += 1
        self.crashed.add(cid)
        self.connected.discard(cid)
        if cid in self.started:
            self.loop.suspend(self.raw[cid])
        group = self.profile.group(self.conditions[cid].group)
        self._at(group.restart.sample(self.rng[cid]), now, "restart", cid)

    def _restart(self, cid: str, now: float) -> None:
        old = self.raw[cid]
        self.loop.call_soon(lambda: old.stop(timeout=0.5, wait=False))  # on the loop's thread
        self.crashed.discard(cid)
        self.stats["restarted"] += 1
        self.devices[cid] = self._make_device(self.devices[cid].spec)  # state as it was persisted
        self.started.discard(cid)
        if cid in self.online:
            self.online.discard(cid)
            self._go_online(cid, now)


_Member = tuple[_Device, TrainJob]


def _batches(members: list[_Member]) -> Iterator[list[tuple[_Member, dict[str, Any]]]]:
    """``members`` (devices holding the same model and plan) in batches of at
    most ``MAX_BATCH`` devices whose list of items stays within
    ``BATCH_HEADER_BUDGET`` bytes of JSON; each member with its item."""
    batch: list[tuple[_Member, dict[str, Any]]] = []
    size = 0
    for dev, job in members:
        item = {"data": dev.spec.data, "data_args": dev.spec.data_args, "seed": job.seed}
        cost = len(json.dumps(item)) + 2
        if batch and (len(batch) >= MAX_BATCH or size + cost > BATCH_HEADER_BUDGET):
            yield batch
            batch, size = [], 0
        batch.append(((dev, job), item))
        size += cost
    if batch:
        yield batch


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    from fedge.files import atomic_write

    atomic_write(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(), False)

