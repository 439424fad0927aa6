"""The aggregator's I/O shell: one MQTT connection, the state directory, the
clock and evaluation around ``RoundCore``.

Start-up order matters: the checkpoint is restored into the core *before*
the connection opens, because the broker delivers the QoS 1 updates it
queued for our persistent session the moment we reconnect.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from aggregator import fleet as fleet_file
from aggregator.artifacts import ArtifactBuilt, ArtifactFailed, OnnxPublisher, publish_artifact
from aggregator.config import AggregatorConfig
from aggregator.cpu import StageClock, staged
from aggregator.enrollment import Enrollment
from aggregator.evaluation import Evaluator
from aggregator.fleet import Fleet
from aggregator.keys import AggregatorKeys
from aggregator.metrics import service_snapshot
from aggregator.optimizers import make_server_optimizer
from aggregator.ratelimit import DeviceLimits, RateLimiter
from aggregator.reporting import RecordHook, RoundReporter
from aggregator.retained import Retained
from aggregator.rounds import (
    Action,
    ClientStatus,
    Event,
    Incident,
    MessageArrived,
    PublishAnnouncement,
    PublishDelta,
    PublishModel,
    RoundCore,
    RoundFinished,
    RoundPolicy,
    SaveCheckpoint,
    SaveRoundOpen,
    SendAck,
    TimerFired,
)
from aggregator.state import StateDir
from fedge import messages
from fedge.chunks import ChunkError, Reassembler, parse_chunk
from fedge.identity import Identity
from fedge.logs import fields
from fedge.messages import Status, TrainingPlan
from fedge.metrics import CountingLink, Traffic
from fedge.mqtt import Inbound, Inbox, LinkDown, LinkUp, MqttLink, monotonic
from fedge.mqtt_loop import MqttLoop
from fedge.records import RoundRecord
from fedge.topics import JobTopics
from fedge.transport import LinkFactory
from fedge.wire import Envelope

if TYPE_CHECKING:
    from aggregator.metrics import AggregatorMetrics

log = logging.getLogger("fedge.aggregator")

# The stage of the core's handling of each event (aggregator.cpu).
FEED_STAGES: dict[type, str] = {MessageArrived: "update", ClientStatus: "presence", TimerFired: "round"}

# A program embedding the service hears each round's record (aggregator.reporting).
__all__ = ["AggregatorService", "RecordHook"]


def build_core(cfg: AggregatorConfig, policy: RoundPolicy | None = None) -> RoundCore:
    """The round core of ``cfg`` (``policy``: the numbers it runs by, if not ``cfg``'s)."""
    from fedge import torchkit

    model = torchkit.build_model(cfg.job.model, cfg.job.model_args, seed=cfg.job.seed)
    policy = policy or RoundPolicy.from_config(cfg)
    plan = TrainingPlan.from_json(dict(cfg.training.__dict__))
    return RoundCore(
        job=cfg.job.name, policy=policy, plan=plan, codec=cfg.codec.spec,
        optimizer=make_server_optimizer(cfg.server), model_factory=cfg.job.model,
        model_args=cfg.job.model_args, initial_model=torchkit.federated_arrays(model),
        downlink=dict(cfg.downlink.codec), key_every=cfg.downlink.key_every,
    )


def restore(core: RoundCore, state: StateDir, job: str) -> None:
    """Load the job's checkpoint (and open-round record) into ``core``, if
    there is one. A crash between checkpoint and log append loses a log
    line; the checkpoint keeps the last records, so write back what is
    missing."""
    loaded = state.load_checkpoint()
    if loaded is None:
        core.resume_round(state.load_open_round())
        return
    arrays, meta = loaded
    core.restore(arrays, meta, state.load_open_round())
    logged = state.logged_rounds()
    for record in core.history:
        if record.round not in logged:
            state.append_round(record.replace(recovered=True).to_json())
    log.info("resumed job %s from checkpoint: next round %d", job, core.next_round)


def _own_loop() -> tuple[MqttLoop, LinkFactory]:
    """The aggregator's link on one epoll thread of its own, not paho's:
    paho wakes its thread through a socket pair for every packet queued (a
    receipt, a device record, an invitation)."""
    loop = MqttLoop(name="fedge-aggregator-mqtt")
    return loop, functools.partial(MqttLink, loop=loop)


class AggregatorService:
    def __init__(self, cfg: AggregatorConfig, on_record: RecordHook | None = None,
                 link_factory: LinkFactory | None = None) -> None:
        """``link_factory`` makes the broker connection (default: an
        ``MqttLink`` on an ``MqttLoop`` of its own, ``_own_loop``; tests
        pass ``fedge.transport.MemoryBroker().link``)."""
        self.loop: MqttLoop | None = None
        if link_factory is None:
            self.loop, link_factory = _own_loop()
        cfg.check()  # the same one-line ConfigError for every caller, not only the command line
        self.cfg = cfg
        self.topics = self.job_topics(cfg)
        self.state = StateDir(cfg.job.state_dir)
        self.core = self.make_core(cfg)
        restore(self.core, self.state, cfg.job.name)
        self.keys = AggregatorKeys(cfg, self.state)
        self.enrollment = Enrollment(self.state.root if self.keys.identity is not None else None,
                                     cfg.limits.max_devices, cfg.limits.max_update_bytes)
        if self.enrollment.signing:
            self.core.verify = self._verify_device
        self._later: list[Event] = []  # events raised while the core handled another
        self._connections = 0  # LinkUps so far: after the first, the broker may have lost what we published
        self._connect(cfg, link_factory)
        self.retained = Retained(self.link, self.topics, self.keys, self.state)
        self.cpu = StageClock(lambda: self.loop.thread_native_id if self.loop is not None else None)
        self.evaluator = Evaluator(cfg)
        self.onnx = (OnnxPublisher(cfg, self.state.root / "onnx", self.inbox.put) if cfg.onnx.every > 0 else None)
        self._stop = threading.Event()
        self.done = threading.Event()
        self.dropped_chunks = 0
        lim = cfg.limits
        self.limits = DeviceLimits(lim.messages_per_s, lim.message_burst, lim.max_update_bytes, lim.max_devices)
        self._failures_logged: set[tuple[str, str]] = set()
        self.artifacts: list[dict[str, Any]] = []
        self.metrics: AggregatorMetrics | None = None
        if cfg.metrics.enabled:
            from aggregator.metrics import AggregatorMetrics

            self.metrics = AggregatorMetrics(cfg.metrics)
        self.checkpoint_time: float | None = self.state.checkpoint_time()
        # Each device as `fedge status` shows it (retained on device/<id>).
        self.fleet = Fleet(cfg.job.name, cfg.limits.max_devices)
        self.fleet.load(self.state.load_json(fleet_file.FILE))
        self._fleet_flushed = 0.0
        self._handle_started = 0.0
        self._last_record: RoundRecord | None = self.core.history[-1] if self.core.history else None
        self.reporter = RoundReporter(
            cfg, self.evaluator, self.state, self.link, self.topics, self.keys, self.cpu, self.metrics, on_record,
            incident=lambda reason: self._feed(Incident(reason, None, monotonic())),
            contained=lambda exc, item: self._contained(exc, item, monotonic()), recorded=self._recorded)

    def job_topics(self, cfg: AggregatorConfig) -> JobTopics:  # a relay's: its region's
        return JobTopics(cfg.job.name)

    def make_core(self, cfg: AggregatorConfig) -> RoundCore:
        return build_core(cfg)

    def _connect(self, cfg: AggregatorConfig, link_factory: LinkFactory) -> None:
        """The inbox, the reassembly of chunked updates and the broker link
        (not started: ``run`` starts it once the checkpoint is restored)."""
        self.inbox = Inbox(maxsize=4096)
        self.updates = Reassembler(
            max_bytes=cfg.limits.reassembly_bytes, max_message_bytes=cfg.limits.max_update_bytes,
            max_partials_per_stream=2, timeout_s=cfg.limits.reassembly_timeout_s,
            check_ids=False)  # RoundCore verifies the envelope's sha256
        self.traffic = Traffic()  # MQTT payload bytes by direction and channel
        link = link_factory(cfg.broker, self.client_id(cfg), self.inbox.put, subscriptions=self.subscriptions(),
                            will=self.goodbye(), name="aggregator")
        link.qos_of = self.subscription_qos
        self.link = CountingLink(link, self.traffic, self.topics.channel)

    def client_id(self, cfg: AggregatorConfig) -> str:
        return f"fedge-aggregator-{cfg.job.name}"

    def subscriptions(self) -> list[str]:  # its own announcement too: see _watch_announcement
        return [self.topics.update_filter, self.topics.status_filter, self.topics.round]

    def subscription_qos(self, topic: str) -> int:  # updates QoS 1; presence and its announcement: retained state
        return 1 if topic == self.topics.update_filter else 0

    def goodbye(self) -> tuple[str, bytes]:
        """Its presence once gone: its last will, and its last message."""
        return self.topics.server, self.keys.seal(Status(messages.AGGREGATOR, "offline").encode())

    # --- identity ---------------------------------------------------------------

    @property
    def identity(self) -> Identity | None:
        """The aggregator's key (None: signing is off)."""
        return self.keys.identity

    def _verify_device(self, client: str, env: Envelope) -> None:
        """The core's check of who made an update or decline."""
        self.enrollment.verify(client, env, self.core.roster.online, monotonic())

    def _later_events(self) -> None:
        """Feed what was raised while the core handled another event (a
        revoked device going offline, for one)."""
        self._later += self.enrollment.revoked
        self.enrollment.revoked = []
        while self._later:
            self._feed(self._later.pop(0))

    # --- lifecycle -------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _job_done(self) -> None:
        """Say once, in the log and in the metrics, how the job ended."""
        records = self.core.history
        last = self._last_record
        failed = self.core.counters.get("rounds_failed", 0)
        linger = self.cfg.job.linger_s
        log.info("job %s is done after round %d (%d failed)%s; %s", self.cfg.job.name, self.core.next_round - 1,
                 failed, "" if last is None or last.accuracy is None else f", final accuracy {last.accuracy:.4f}",
                 "serving its final state and metrics until stopped (SIGTERM or Ctrl-C; job.linger_s sets a time)"
                 if linger == 0 else f"serving its final state and metrics for {linger:g} s (job.linger_s)",
                 extra=fields(status="done", round=records[-1].round if records else None))
        if self.metrics is not None:
            self._publish_metrics(monotonic())

    def run(self) -> int:
        """Run until ``stop()``, or until ``job.linger_s`` after the job is
        done; returns 0. A job's end is a state, not an exit: ``done`` is
        set at once, and the service goes on publishing its final state
        and serving metrics (``fedge_job_done`` 1) so that a scrape, a
        watcher and a late device all see how it ended."""
        now = monotonic()
        self.cpu.start()
        self.retained.key_chain()  # first, so that devices know the key before what it signed
        if self.metrics is not None:
            self.metrics.start()  # first: a port already taken is a ConfigError before anything is published
        self._handle_started = time.perf_counter()
        self._execute(self.core.start(now))
        if self.core.state == "done":
            log.info("job %s already ran all %d rounds; publishing its final state", self.cfg.job.name,
                     self.cfg.job.rounds)
            self.done.set()
        self.link.start()
        done_at: float | None = None
        try:
            while not self._stop.is_set():
                if done_at is None and self.done.is_set() and not self._exporting():
                    done_at = monotonic()
                    self._job_done()
                if done_at is not None and 0 < self.cfg.job.linger_s <= monotonic() - done_at and (
                        self.link.connected.is_set()
                        or monotonic() - done_at > self.cfg.job.linger_s + self.cfg.broker.keepalive_s):
                    break  # (the final state is out first, unless the broker stays away)
                self._turn()
        finally:
            with contextlib.suppress(Exception):  # what the fleet view last heard, out before we go
                self._publish_fleet(monotonic())
                if self.fleet.changed:
                    self.state.save_json(fleet_file.FILE, self.fleet.to_json())
            self.link.stop(final=self.goodbye())
            if self.loop is not None:
                self.loop.close()
            if self.metrics is not None:
                self.metrics.close()
        return 0

    def _turn(self) -> None:
        """One turn of the loop: the next message (or none, by the core's next deadline),
        what it raised, the registry, the timer, and what is published periodically."""
        deadline = self.core.next_deadline()
        wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - monotonic()))
        item = self.inbox.get(timeout=wait)
        now = monotonic()
        if item is not None:
            try:
                self._dispatch(item, now)
            except Exception as exc:  # one bad message must never stop the job
                self._contained(exc, item, now)
        self._later_events()
        self.updates.expire(now)
        for client, payload in self.enrollment.poll(self.core.roster.online, now):
            self._presence(client, payload, now)
        if self.retained.refresh_presence(now, self.core.mode.awaits_devices()):
            self._feed(Incident("presence_refreshed", None, now))
        self._later_events()
        self._feed(TimerFired(now))
        if self.core.state == "done":  # however it ended (its last round, or a budget)
            self.done.set()
        if self.metrics is not None and self.metrics.collector.due(now):
            self._publish_metrics(now)
        if self.fleet.dirty and now - self._fleet_flushed >= 1.0:
            self._publish_fleet(now)

    # --- events ----------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        """Hand ``event`` to the core and carry out what it returns. Contained:
        whatever goes wrong is counted and logged, and the loop goes on."""
        started = self._handle_started = time.perf_counter()
        accepted = self.core.counters["accepted"]
        try:
            with self.cpu.stage(FEED_STAGES.get(type(event), "other")):
                actions = self.core.handle(event)
            self._execute(actions)
        except Exception as exc:
            self._contained(exc, event, getattr(event, "now", monotonic()))
        if (self.metrics is not None and isinstance(event, MessageArrived)
                and self.core.counters["accepted"] > accepted):
            self.metrics.fold_seconds.observe(time.perf_counter() - started)

    def _contained(self, exc: Exception, item: object, now: float) -> None:
        """A failure no input may cause: counted as ``internal_error`` and
        logged with its traceback the first time for each kind of failure."""
        kind = (type(item).__name__, type(exc).__name__)
        if kind not in self._failures_logged:
            self._failures_logged.add(kind)
            log.exception("failed to handle %s (counted as internal_error; repeats are not logged)", kind[0])
        with contextlib.suppress(Exception):
            self.core.handle(Incident("internal_error", None, now))

    def _exporting(self) -> bool:
        return self.onnx is not None and self.onnx.busy

    @staged("receive")
    def _dispatch(self, item: object, now: float) -> None:
        if isinstance(item, ArtifactBuilt):
            publish_artifact(self.retained, self.topics, self.cfg.onnx.name, item)
            self.artifacts.append(item.summary)
            return
        if isinstance(item, ArtifactFailed):
            self._feed(Incident("onnx_failed", None, now))
            log.error("ONNX export of round %d failed (the job goes on): %s", item.round, item.error,
                      extra=fields(round=item.round, reason="onnx_failed"))
            return
        if isinstance(item, LinkUp):
            log.info("connected to %s (session present: %s)", self.link.address, item.session_present)
            self.link.publish(self.topics.server, self.keys.seal(Status(messages.AGGREGATOR, "online").encode()),
                              retain=True)
            self._connections += 1
            if self._connections > 1 and not item.session_present:
                self._repair_broker(now)
            return
        if isinstance(item, LinkDown):
            log.warning("lost the broker (%s); reconnecting", item.reason)
            return
        if not isinstance(item, Inbound):
            return
        channel, client = self.topics.parse(item.topic)
        self.traffic.add("in", channel, len(item.payload))
        if channel == "round":
            self._watch_announcement(item.payload, now)
        elif channel == "status" and client:
            self._presence(client, item.payload, now)
        elif channel == "update" and client:
            self._update_chunk(client, item.payload, now)

    def _update_chunk(self, client: str, payload: bytes, now: float) -> None:
        """A chunk of a device's update (or decline, or secure-aggregation message):
        charged to its rate, reassembled, its signature checked and, once whole, fed."""
        if self._limited(self.limits.chunk_bytes, client, "update bytes", now, cost=len(payload)):
            return
        try:
            if not self.core.expects_update_from(client) and parse_chunk(payload).count > 1:
                # Reassembly space is for the devices a round waits for; a
                # one-chunk message (a decline, a stray update) still gets
                # its receipt.
                raise ChunkError("not_selected", "a multi-chunk message from a device no round waits for")
            message = self.updates.feed(client, payload, now)
        except ChunkError as exc:
            self.dropped_chunks += 1
            self._feed(Incident(f"chunk_{exc.reason}", client, now))
            if self.limits.log.allow((client, exc.reason), now):
                log.warning("dropped a chunk from %s: %s", client, exc,
                            extra=fields(device=client, reason=f"chunk_{exc.reason}"))
            return
        if message is None:
            return
        with self.cpu.stage("verify"):
            env = self.enrollment.signed_by(client, message, self.core.roster.online, now)
        if env is not None and self._limited(self.limits.messages, client, "messages", now):
            self.enrollment.verified = None
            return
        if env is not None:
            self.fleet.heard(client, time.time())
        self._feed(MessageArrived(client, message, now, env))  # a forgery: the core refuses and counts it
        self.enrollment.verified = None

    def _presence(self, client: str, payload: bytes, now: float) -> None:
        """A device's presence: believed, charged to its rate (after the signature
        is checked: an outsider's forgeries cost only its own refusals), fed."""
        event = self.enrollment.presence(client, payload, now, self.core.roster.online,
                                         lambda reason: self._feed(Incident(reason, client, now)), self.limits.log)
        self.retained.presence_at = now
        if event is not None and not self._limited(self.limits.presence, client, "presence", now):
            self._feed(event)
            self.fleet.presence(client, event.online, event.info, time.time())

    def _repair_broker(self, now: float) -> None:
        """The broker kept no session for us (restarted without persistence,
        or it expired): it most likely lost the retained messages too.
        Publish again everything the job keeps there."""
        log.warning("the broker at %s kept no session for the aggregator (restarted without persistence?): "
                    "publishing the key chain, model, delta, announcement and device records again",
                    self.link.address, extra=fields(reason="broker_repaired"))
        self._feed(Incident("broker_repaired", None, now))
        self.retained.key_chain()
        self._execute(self.core.republish(now))
        self.fleet.dirty.update(self.fleet.entries)

    def _watch_announcement(self, payload: bytes, now: float) -> None:
        """The retained announcement as the broker holds it: replaced when it
        is not ours (``Retained.foreign``)."""
        if not self.retained.foreign(payload, now):
            return
        self._feed(Incident("announcement_repaired", None, now))
        log.warning("the broker's retained announcement is %s; publishing the current one again",
                    "gone" if not payload else "not one this aggregator published",
                    extra=fields(reason="announcement_repaired"))
        self._execute([a for a in self.core.republish(now) if isinstance(a, PublishAnnouncement)])

    def _limited(self, limiter: RateLimiter, client: str, what: str, now: float, cost: float = 1.0) -> bool:
        """Whether ``client`` is over its rate for ``what`` (counted)."""
        if not self.limits.over(limiter, client, what, now, cost):
            return False
        self._feed(Incident("rate_limited", client, now))
        return True

    # --- actions ---------------------------------------------------------------

    @staged("publish")
    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SaveCheckpoint):
                self._save(action)
            elif isinstance(action, SaveRoundOpen):
                with self.cpu.stage("save"):
                    self.state.save_open_round(action.record, action.durable)
            elif isinstance(action, PublishModel):
                self.retained.chunked("key", self.topics.key_chunk, action.message)
            elif isinstance(action, PublishDelta):
                self.retained.chunked("delta", self.topics.delta_chunk, action.message)
            elif isinstance(action, PublishAnnouncement):
                self.retained.announcement(action.message)
            elif isinstance(action, SendAck):
                self.link.publish(self.topics.ack(action.client), self.keys.seal(action.message))
                if action.receipt:
                    self.fleet.receipt(action.client, action.receipt, action.round, time.time())
            elif isinstance(action, RoundFinished):
                self._finish_round(action)

    @staged("save")
    def _save(self, action: SaveCheckpoint) -> None:
        self.state.save_checkpoint(action.arrays, action.meta)
        self.checkpoint_time = time.time()
        if self.fleet.changed:
            self.state.save_json(fleet_file.FILE, self.fleet.to_json())

    @staged("other")  # the round's record and its evaluation, below: stages of their own
    def _finish_round(self, fin: RoundFinished) -> None:
        try:
            self._record_round(fin)
        finally:  # whatever went wrong with the record, a finished job is done
            if fin.last:
                self.done.set()

    def _record_round(self, fin: RoundFinished) -> None:
        record = self.reporter.report(fin, self._handle_started, self.dropped_chunks)
        if self.onnx is not None and record.status == "ok" and self.onnx.due(record.round, fin.last):
            self.onnx.submit(record.round, self.core.exact_model_message())

    def _recorded(self, record: RoundRecord) -> None:
        self._last_record = record
        if self.metrics is not None:
            self._publish_metrics(monotonic())

    @staged("records")
    def _publish_fleet(self, now: float) -> None:
        """Publish the device records that changed, retained, signed; a
        failure is counted (``internal_error``), never the loop's end."""
        self._fleet_flushed = now
        try:
            for record in self.fleet.take_dirty():
                self.link.publish(self.topics.device(record.device), self.keys.seal(record.encode()), retain=True)
        except Exception as exc:
            self._contained(exc, "fleet records", now)

    def _publish_metrics(self, now: float) -> None:
        """Swap a fresh snapshot in for the metrics listener's thread."""
        assert self.metrics is not None
        try:
            self.metrics.collector.publish(self._metrics_snapshot(), now)
        except Exception:  # metrics must never stop the job
            self._feed(Incident("metrics_failed", None, now))
            log.exception("building the metrics snapshot failed (counted as metrics_failed)")

    def _metrics_snapshot(self) -> dict[str, Any]:
        """Plain data, copied on the loop's thread: what ``aggregator.metrics.render`` shows."""
        snap = service_snapshot(self.cfg, self.core, self._last_record, self.traffic.copy(),
                                (self.link.connected.is_set(), self.link.connect_failures, self.link.messages_dropped,
                                 getattr(self.link, "subscribe_refused", 0)),
                                self.updates.held, len(self.inbox), self.checkpoint_time)
        snap["cpu_seconds"] = self.cpu.current()
        return snap

