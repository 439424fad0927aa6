"""The agent's I/O shell: MQTT connections, the state directory, the training
pool and timers around one or many agent cores, all on one thread.

A real device runs one agent. A simulated fleet (the demo, benchmarks) runs
many, each with its own MQTT connection and state directory, sharing one
small pool of training workers: the same code path either way.

A device is a ``trainer`` (``AgentCore``: rounds, updates) or an
``inference`` device (``InferenceCore``: it installs the ONNX artifact the
aggregator publishes and serves predictions with ONNX Runtime).

This module never imports PyTorch; training happens in worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import capabilities
from edge_agent.config import ROLES, check_choice
from edge_agent.core import (
    AckArrived,
    Action,
    AgentCore,
    AnnouncementArrived,
    Connected,
    DeltaArrived,
    Event,
    KeyArrived,
    ModelBytes,
    ModelMemo,
    PersistKey,
    PersistResidual,
    PersistState,
    PublishStatus,
    PublishUpdate,
    Refetch,
    StartTraining,
    Subscribe,
    Tick,
    TrainingDone,
    TrainingFailed,
    TrainJob,
    Unsubscribe,
)
from edge_agent.inference import ArtifactArrived, ArtifactServed, InferenceCore, InstallArtifact, InstallFailed
from edge_agent.pool import Outcome, TrainingPool
from edge_agent.serve import PredictionServer, ServedModel
from edge_agent.state import StateDir
from fedge import tensors, wire
from fedge.chunks import ChunkError, Reassembler
from fedge.config import BrokerSettings
from fedge.files import atomic_write
from fedge.identity import Identity, IdentityError, PublicKey, check_signed, follow_chain
from fedge.logs import fields
from fedge.messages import KeyChain, ProtocolError, Status
from fedge.metrics import CountingLink, MetricsSettings, Traffic
from fedge.mqtt import Inbound, Inbox, LinkDown, LinkUp, MqttLink, monotonic
from fedge.topics import JobTopics, check_id
from fedge.transport import LinkFactory
from fedge.wire import Kind

if TYPE_CHECKING:
    from edge_agent.metrics import AgentMetrics

log = logging.getLogger("fedge.agent")
# Where a simulated device may drop out of a round: before its secure
# aggregation keys, its shares, its update (the only stage of a plain round)
# or its revealed shares.
DROPOUT_STAGES = ("keys", "shares", "update", "reveal")
PRESENCE_REPAIR_S = 5.0  # at most one presence repair per device this often
SHARED_CHECK_BYTES = 64 << 10  # a simulated fleet checks a signed message this large once for all its devices
TRAFFIC_ROUNDS = 1024  # rounds of traffic counts kept for the demo and benchmarks


@dataclass
class DeviceSpec:
    client_id: str
    job: str
    data: str
    data_args: dict[str, Any]
    state_dir: Path
    accepted_model: str = ""
    max_model_bytes: int = 256 << 20
    resend_after_s: float = 20.0
    model_wait_s: float = 30.0  # see agent.model_wait_s
    info: dict[str, Any] = field(default_factory=dict)
    broker: BrokerSettings | None = None  # this device's own credentials; default: the runtime's
    role: str = "trainer"  # or "inference"
    artifact: str = "model"  # inference: the artifact name to install
    serve: str = ""  # inference: host:port of the local prediction API
    threads: int = 0  # inference: ONNX Runtime threads
    downlink: str = "on_demand"  # trainer: fetch models only when selected, or "follow" every one
    durable: bool = True  # fsync state writes; simulated fleets sharing one disk may skip it
    # Signing (both or neither): this device's key, and the aggregator's it
    # believes. With them, everything the device publishes is signed and
    # everything it acts on must be signed by that aggregator.
    identity: Identity | None = None
    aggregator_key: PublicKey | None = None
    # A relayed job: the region whose relay this device talks to, and the
    # root's key, which signs the model (aggregator_key is then the relay's).
    region: str = ""
    root_key: PublicKey | None = None
    receipts_qos: int = 1  # agent.receipts_qos
    # Simulation only (the demo, tests, benchmarks): in each round, with this
    # probability, the device goes silent at one of ``dropout_stages``
    # (chosen at random) and sends nothing more for that round.
    dropout: float = 0.0
    dropout_stages: tuple[str, ...] = DROPOUT_STAGES


class RefusalLog:
    """Which refused messages get a log line: every distinct one (a new
    forgery is never hidden behind an older one of the same reason), but
    not the same bytes again (a retained copy resent on each subscription,
    a QoS 1 redelivery), and at most ``per_minute`` lines a minute per
    reason, the next line saying how many were left out."""

    def __init__(self, per_minute: int = 5, remembered: int = 64) -> None:
        self.per_minute = per_minute
        self.remembered = remembered
        self._seen: dict[bytes, None] = {}  # digests of refused messages, oldest first
        self._windows: dict[str, tuple[float, int, int]] = {}  # reason -> (window start, lines, left out)

    def allow(self, reason: str, message: bytes, now: float) -> str | None:
        """None: no line for this refusal; else the note the line ends with."""
        digest = hashlib.sha256(message).digest()[:16]
        if digest in self._seen:
            return None
        self._seen[digest] = None
        if len(self._seen) > self.remembered:
            del self._seen[next(iter(self._seen))]
        start, lines, left_out = self._windows.get(reason, (now, 0, 0))
        if now - start >= 60.0:
            start, lines = now, 0
        if lines >= self.per_minute:
            self._windows[reason] = (start, lines, left_out + 1)
            return None
        self._windows[reason] = (start, lines + 1, 0)
        return f"; {left_out} more refused for this reason were not logged" if left_out else ""


@dataclass(frozen=True)
class _Trained:
    client_id: str
    job_id: str
    outcome: Outcome


class _Device:
    def __init__(self, spec: DeviceSpec, broker: BrokerSettings, inbox: Inbox, link_factory: LinkFactory,
                 memo: ModelMemo | None = None, blobs: Path | None = None) -> None:
        self.spec = spec
        self.memo = memo
        self.topics = JobTopics(spec.job, spec.region)
        self.store = StateDir(spec.state_dir, durable=spec.durable, blobs=blobs)
        info = spec.info or capabilities.describe(spec.role)
        self.core: AgentCore | InferenceCore
        self.served: ServedModel | None = None
        check_choice(spec.role, ROLES, "agent.role")
        if spec.role == "inference":
            self.core = InferenceCore(spec.client_id, spec.job, spec.artifact, info)
            subscriptions = [self.topics.artifact_filter(spec.artifact), self.topics.status(spec.client_id)]
        else:
            state, update = self.store.load()
            self.core = AgentCore(
                client_id=spec.client_id, job=spec.job, info=info, accepted_model=spec.accepted_model,
                resend_after_s=spec.resend_after_s, downlink=spec.downlink, model_wait_s=spec.model_wait_s,
                state=state, update_bytes=update,
                residual=self.store.load_residual(), memo=memo,
            )
            key = self.store.load_key()
            if key is not None:
                self.core.restore_key(key)
            # The model channels are subscribed as the core asks (Subscribe actions).
            subscriptions = [self.topics.round, self.topics.ack(spec.client_id), self.topics.status(spec.client_id)]
        self.downloads = Reassembler(
            max_bytes=2 * spec.max_model_bytes, max_message_bytes=spec.max_model_bytes,
            max_partials_per_stream=2, timeout_s=300.0,
            check_ids=False,  # the cores verify the envelope's sha256
        )
        self.presence_repaired = -PRESENCE_REPAIR_S
        if (spec.identity is None) != (spec.aggregator_key is None):
            raise ValueError("a device signs and verifies, or neither: give identity and aggregator_key together")
        # The key the aggregator signs with now: the pinned one, or where its
        # key chain led from it (kept while the pin stays the same).
        self.aggregator_key = spec.aggregator_key
        if spec.aggregator_key is not None:
            subscriptions.insert(0, self.topics.keys)  # first: the key before what it signed
            stored = self.store.load_identity()
            if stored.get("pinned") == spec.aggregator_key.to_text() and isinstance(stored.get("current"), str):
                with contextlib.suppress(IdentityError):  # a damaged file: back to the pin
                    self.aggregator_key = PublicKey.from_text(stored["current"])
        self.refused: Counter[str] = Counter()  # messages not believed, by reason
        self.dropped_rounds: dict[int, str] = {}  # simulated dropouts: round -> the stage it went silent at
        self.refusal_log = RefusalLog()
        self.link = link_factory(
            spec.broker or broker, spec.client_id, inbox.put, subscriptions=subscriptions,
            will=(self.topics.status(spec.client_id), self.presence(self.core.status("offline"))),
        )
        # Retained state at QoS 0 (no session state for it); receipts at agent.receipts_qos.
        self.link.qos_of = lambda topic: min(self.topics.subscription_qos(topic), spec.receipts_qos)

    # --- signing -------------------------------------------------------------------

    def sign(self, message: bytes) -> bytes:
        return message if self.spec.identity is None else wire.seal(message, self.spec.identity)

    def presence(self, message: bytes) -> bytes:
        """A presence message numbered above every earlier one (persisted
        first), then signed: the aggregator refuses an old one replayed."""
        if self.spec.identity is None:
            return message
        status = Status.parse(wire.decode(message, max_body=0))
        stored = self.store.load_identity()
        seq = max(int(stored.get("presence_seq", 0)) + 1, int(time.time() * 1000))
        self.store.save_identity({**stored, "presence_seq": seq})
        return self.sign(Status(status.sender, status.state, status.info, seq).encode())

    def believed(self, message: bytes, what: str, now: float, digest: bytes = b"", model: bool = False) -> bool:
        """Whether ``message`` is signed by the aggregator this device pins
        (always, when signing is off; a relayed job's ``model`` messages: by
        the root); a refusal is counted and logged at most once a minute per
        reason. A signed announcement must not be older than the newest one
        taken (a replay)."""
        key = self.aggregator_key
        if model and self.spec.root_key is not None:
            key = self.spec.root_key  # a relay cannot forge the model
        if key is None:
            return True
        try:
            if self.memo is not None and len(message) >= SHARED_CHECK_BYTES:
                # The same bytes under the same key: checked once for the devices of this process.
                env = self.memo.get(("signed", digest or hashlib.sha256(message).digest(), key.to_text(), what),
                                    lambda: _signed(message, key, what))
            else:
                env = _signed(message, key, what)
            if env.kind == Kind.ROUND:
                seq = env.header.get("seq")
                if isinstance(seq, bool) or not isinstance(seq, int):
                    raise IdentityError(f"{what} carries no sequence number", "unsequenced")
                stored = self.store.load_identity()
                if seq < int(stored.get("announcement_seq", 0)):
                    raise IdentityError(f"{what} is older than one already taken (a replay)", "replayed")
                if seq > int(stored.get("announcement_seq", 0)):
                    self.store.save_identity({**stored, "announcement_seq": seq})
        except (wire.WireError, IdentityError) as exc:
            reason = exc.reason
            self.refused[reason] += 1
            said = self.refusal_log.allow(reason, message, now)
            if said is not None:
                log.warning("%s: not acting on %s (%s; counted%s)", self.spec.client_id, what, exc, said,
                            extra=fields(device=self.spec.client_id, reason=reason))
            return False
        return True

    def follow_keys(self, payload: bytes, now: float) -> bool:
        """Take the aggregator's key chain: walk it from the key trusted now;
        the chain itself must be signed by where it leads. True when the key
        moved on (the device then asks for retained messages again, as some
        signed by the new key may have been refused before the chain came)."""
        pinned = self.spec.aggregator_key
        if pinned is None or self.aggregator_key is None:
            return False
        try:
            env = wire.decode(payload, max_body=0)
            chain = KeyChain.parse(env)
            if chain.job != self.spec.job:
                raise IdentityError(f"a key chain for job {chain.job!r}", "wrong_job")
            new = follow_chain(self.spec.job, self.aggregator_key, [(k.old, k.new, k.signature) for k in chain.links])
            check_signed(env, new, "a key chain")
        except (wire.WireError, ProtocolError, IdentityError) as exc:
            self.refused[exc.reason] += 1
            log.warning("%s: not acting on a key chain (%s)", self.spec.client_id, exc,
                        extra=fields(device=self.spec.client_id))
            return False
        if new == self.aggregator_key:
            return False
        log.warning("%s: the aggregator's key rotated from %s to %s (signed over by the old key)",
                    self.spec.client_id, self.aggregator_key.fingerprint, new.fingerprint,
                    extra=fields(device=self.spec.client_id))
        self.store.save_identity({**self.store.load_identity(), "pinned": pinned.to_text(), "current": new.to_text()})
        self.aggregator_key = new
        for topic in list(getattr(self.link, "subscriptions", [])):
            if topic != self.topics.keys:
                self.link.subscribe(topic)
        return True

    def silenced(self, message: bytes) -> bool:
        """Whether a simulated dropout keeps ``message`` from being sent."""
        if self.spec.dropout <= 0:
            return False
        peeked = wire.peek(message)
        if peeked is None:
            return False
        kind, header = peeked
        round_ = header.get("round")
        if kind == Kind.SECAGG:
            stage = {"keys": "keys", "shares": "shares", "reveal": "reveal"}.get(str(header.get("stage")), "")
        elif kind in (Kind.UPDATE, Kind.DECLINE):
            stage = "update"
        else:
            return False
        if not isinstance(round_, int) or not stage:
            return False
        if round_ not in self.dropped_rounds:
            rng = random.Random(f"{self.spec.client_id}/{round_}/dropout")
            chosen = rng.choice(self.spec.dropout_stages) if rng.random() < self.spec.dropout else ""
            self.dropped_rounds = {**dict(list(self.dropped_rounds.items())[-15:]), round_: chosen}
            if chosen:
                log.info("%s: simulated dropout: silent in round %d from its %s on", self.spec.client_id, round_,
                         chosen, extra=fields(device=self.spec.client_id))
        chosen = self.dropped_rounds[round_]
        return bool(chosen) and DROPOUT_STAGES.index(stage) >= DROPOUT_STAGES.index(chosen)

    # --- inference devices ---------------------------------------------------------

    @property
    def model_file(self) -> Path:
        return self.spec.state_dir / f"{self.spec.artifact}.onnx"

    def install(self, art: Any) -> None:
        """Write the verified file and its manifest, then serve it."""
        durable = self.spec.durable
        atomic_write(self.model_file.with_suffix(".manifest.json"), json.dumps(art.manifest, indent=2).encode(),
                     durable)
        atomic_write(self.model_file.with_suffix(".info.json"), json.dumps(self._info(art)).encode(), durable)
        atomic_write(self.model_file, art.body, durable)
        if not self.load():
            assert isinstance(self.core, InferenceCore)
            self.core.handle(InstallFailed(art.sha256))

    def _info(self, art: Any) -> dict[str, Any]:
        return {"round": art.round, "sha256": art.sha256, "variant": art.variant, "name": art.name}

    def load(self) -> bool:
        """(Re)load the installed model, if its bytes still match what was
        installed; a device restarts serving before the broker answers."""
        from fedge.onnxrt import OnnxModelError, OnnxPredictor

        info_file = self.model_file.with_suffix(".info.json")
        if not self.model_file.exists() or not info_file.exists():
            return False
        info = json.loads(info_file.read_text())
        if hashlib.sha256(self.model_file.read_bytes()).hexdigest() != info.get("sha256"):
            log.error("%s: %s does not match its recorded sha256; waiting for a fresh copy",
                      self.spec.client_id, self.model_file, extra=fields(device=self.spec.client_id))
            return False
        try:
            predictor = OnnxPredictor(self.model_file, threads=self.spec.threads or None)
        except OnnxModelError as exc:
            log.error("%s: cannot serve %s: %s", self.spec.client_id, self.model_file, exc,
                      extra=fields(device=self.spec.client_id))
            return False
        self.served = ServedModel(predictor, info)
        self._warn_if_int8_saturates()
        assert isinstance(self.core, InferenceCore)
        self.core.handle(ArtifactServed(int(info["round"]), str(info["sha256"])))
        log.info("%s: serving %s of round %d (%s, sha256 %s)", self.spec.client_id, self.model_file.name,
                 info["round"], info["variant"], info["sha256"][:12], extra=fields(device=self.spec.client_id))
        return True

    def _warn_if_int8_saturates(self) -> None:
        """An x86 CPU without VNNI saturates int8 pair sums where the model's
        target (full 8-bit weights) does not: its answers may differ. Say so."""
        from fedge.cpu import host_cpu

        try:
            manifest = json.loads(self.model_file.with_suffix(".manifest.json").read_text())
        except (OSError, ValueError):
            return
        quant = manifest.get("quantization") if isinstance(manifest, dict) else None
        if isinstance(quant, dict) and manifest.get("precision") == "int8" and quant.get("reduce_range") is False \
                and host_cpu().int8_saturation_expected:
            log.warning("%s: this CPU (%s) saturates int8 pair sums that %s's full 8-bit weights can reach (it was "
                        "quantized for %s): answers may differ from the target's; set onnx.target = \"x86\" for "
                        "devices like this one", self.spec.client_id, host_cpu().describe(), self.model_file.name,
                        quant.get("target"), extra=fields(device=self.spec.client_id))


def _signed(message: bytes, key: PublicKey, what: str) -> wire.Envelope:
    env = wire.decode(message)
    check_signed(env, key, what)
    return env


def _served_by(dev: _Device) -> Callable[[], ServedModel | None]:
    return lambda: dev.served


class AgentRuntime:
    def __init__(self, devices: list[DeviceSpec], broker: BrokerSettings, pool: TrainingPool,
                 tick_s: float = 0.5, link_factory: LinkFactory = MqttLink,
                 metrics: MetricsSettings | None = None, shared_models: bool = False,
                 shared_files: Path | None = None) -> None:
        """``link_factory`` makes each device's broker connection (``MqttLink``;
        tests pass ``fedge.transport.MemoryBroker().link``); ``metrics``, when
        enabled, serves Prometheus metrics from ``start()`` to ``close()``;
        ``shared_models`` (a simulated fleet): devices that receive the same
        model bytes decode them once and hold one copy (``ModelMemo``), and
        with ``shared_files`` (a directory) store one copy of the key model
        there, hard-linked into each device's state directory."""
        for d in devices:
            check_id(d.client_id, "agent id")
        self.broker = broker
        self.link_factory = link_factory
        self.memo = ModelMemo() if shared_models else None
        self.blobs = shared_files
        if shared_files is not None:
            shared_files.mkdir(parents=True, exist_ok=True)
        self.inbox = Inbox(maxsize=max(1024, 64 * len(devices)))
        # MQTT payload bytes by direction and channel, for metrics.
        self.bytes_by_channel = Traffic()
        self.devices = {d.client_id: self._make_device(d) for d in devices}
        self.connected: set[str] = set()
        self.last_training: dict[str, Any] = {}  # the newest training run of any device
        self.metrics: AgentMetrics | None = None
        if metrics is not None and metrics.enabled:
            from edge_agent.metrics import AgentMetrics

            self.metrics = AgentMetrics(metrics)
        self.pool = pool
        self.tick_s = tick_s
        self._stop = threading.Event()
        self.presence_repairs = 0  # times a device's presence was published again (see _own_presence)
        self.failures: Counter[tuple[str, str]] = Counter()  # (what was handled, exception type) -> count
        # MQTT payload bytes [sent, received] by all devices, by the round the
        # traffic served (what the demo and benchmarks report): a model of round
        # m serves round m + 1; announcements, updates and receipts their own.
        # The newest TRAFFIC_ROUNDS rounds only: a device runs for months.
        self.traffic: dict[int, list[int]] = {}
        self._partial_bytes: dict[tuple[str, str], int] = {}
        self.servers: list[PredictionServer] = []
        for dev in self.devices.values():
            if dev.spec.role == "inference":
                dev.load()
                if dev.spec.serve:
                    self.servers.append(PredictionServer(dev.spec.serve, _served_by(dev)))

    def _make_device(self, spec: DeviceSpec) -> _Device:
        dev = _Device(spec, self.broker, self.inbox, self.link_factory, self.memo, self.blobs)
        dev.link = CountingLink(dev.link, self.bytes_by_channel, dev.topics.channel)
        return dev

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.metrics is not None:
            self.metrics.start()
            self._publish_metrics(monotonic())
        for server in self.servers:
            server.start()
            log.info("prediction API on http://%s:%d (POST /predict, GET /health)",
                     server.httpd.server_address[0], server.port)
        for dev in self.devices.values():
            dev.link.start()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for server in self.servers:
            server.stop()
        for dev in self.devices.values():
            dev.link.stop(final=(dev.topics.status(dev.spec.client_id), dev.presence(dev.core.status("offline"))))

    def run(self) -> None:
        """Process events until ``stop()``; call ``start()`` first."""
        next_tick = monotonic() + self.tick_s
        while not self._stop.is_set():
            item = self.inbox.get(timeout=min(0.25, next_tick - monotonic()))
            now = monotonic()
            if item is not None:
                try:
                    self._dispatch(item, now)
                except Exception as exc:  # a bug in one message's handling must not stop the device
                    self._contained(getattr(item, "link", "agent"), exc, item)
            if now >= next_tick:
                next_tick = now + self.tick_s
                for dev in self.devices.values():
                    dev.downloads.expire(now)
                    self._run(dev, Tick(now))
            if self.metrics is not None and self.metrics.collector.due(now):
                self._publish_metrics(now)
            self._idle(now)

    def _idle(self, now: float) -> None:
        """Called after each pass of ``run``'s loop (a simulated fleet's timers)."""

    def _publish_metrics(self, now: float) -> None:
        assert self.metrics is not None
        try:
            self.metrics.collector.publish(self._metrics_snapshot(), now)
        except Exception as exc:  # metrics must never stop the device
            self._contained("agent", exc, "metrics")

    def _metrics_snapshot(self) -> dict[str, Any]:
        """Plain data, copied on the loop's thread: what ``edge_agent.metrics.render`` shows."""
        import fedge

        counters: Counter[str] = Counter()
        for dev in self.devices.values():
            counters.update(dev.core.counters)
            counters.update({f"refused_{k}": v for k, v in dev.refused.items()})
        counters["presence_repaired"] = self.presence_repairs
        counters["internal_error"] = sum(self.failures.values())
        return {
            "version": fedge.__version__,
            "devices": [(d.spec.client_id, d.spec.job, d.spec.role) for d in self.devices.values()],
            "connected": len(self.connected),
            # The links' own state (through each CountingLink), as their network threads see it.
            "broker_connected": all(d.link.connected.is_set() for d in self.devices.values()),
            "broker_connect_failures": sum(d.link.connect_failures for d in self.devices.values()),
            "broker_messages_dropped": sum(d.link.messages_dropped for d in self.devices.values()),
            "broker_subscriptions_refused": sum(getattr(d.link, "subscribe_refused", 0) for d in self.devices.values()),
            "counters": {k: v for k, v in counters.items() if v},
            "traffic": self.bytes_by_channel.copy(),
            "last_training": dict(self.last_training),
        }

    # --- events ----------------------------------------------------------------

    def _dispatch(self, item: object, now: float) -> None:
        if isinstance(item, _Trained):
            dev = self.devices[item.client_id]
            self._run(dev, self._training_event(item, now))
            return
        if isinstance(item, LinkUp):
            self.connected.add(item.link)
            self._run(self.devices[item.link], Connected(now))
            return
        if isinstance(item, LinkDown):
            self.connected.discard(item.link)
            log.warning("%s: lost the broker (%s); reconnecting", item.link, item.reason,
                        extra=fields(device=item.link))
            return
        if not isinstance(item, Inbound):
            return
        dev = self.devices[item.link]
        channel, _ = dev.topics.parse(item.topic)
        self.bytes_by_channel.add("in", channel, len(item.payload))
        if channel == "status":
            if item.topic == dev.topics.status(dev.spec.client_id):  # some brokers send more than was subscribed
                self._own_presence(dev, item.payload, now)
            return
        if not item.payload:
            return  # a cleared retained message
        if channel in ("key", "delta", "artifact"):
            stream = (item.link, channel)
            self._partial_bytes[stream] = self._partial_bytes.get(stream, 0) + len(item.payload)
            try:
                message = dev.downloads.feed(channel, item.payload, now)
            except ChunkError as exc:
                log.warning("%s: dropped a %s chunk: %s", item.link, channel, exc, extra=fields(device=item.link))
                return
            if message is None:
                if channel != "artifact":
                    self._run(dev, ModelBytes(now))
            else:
                self._count_traffic(message, 1, self._partial_bytes.pop(stream, 0), serves_next=True)
                # Hashed once for the checks a simulated fleet shares and the key's shared file.
                digest = hashlib.sha256(message).digest() if self.memo is not None and len(
                    message) >= SHARED_CHECK_BYTES else b""
                if dev.believed(message, f"a {channel} message", now, digest, model=True):
                    if channel == "key":
                        self._run(dev, KeyArrived(message, now, digest))
                    else:
                        arrived = {"delta": DeltaArrived, "artifact": ArtifactArrived}[channel]
                        self._run(dev, arrived(message, now))
        elif channel == "keys":
            dev.follow_keys(item.payload, now)
        elif channel == "round":
            self._count_traffic(item.payload, 1, len(item.payload))
            if dev.believed(item.payload, "an announcement", now):
                self._run(dev, AnnouncementArrived(item.payload, now))
        elif channel == "ack":
            self._count_traffic(item.payload, 1, len(item.payload))
            if dev.believed(item.payload, "a receipt", now):
                self._run(dev, AckArrived(item.payload, now))

    def _own_presence(self, dev: _Device, payload: bytes, now: float) -> None:
        """The device's own retained presence, as the broker holds it. While
        the device is connected it is online, whatever the topic says: an
        "offline" (forged, or a stale will) or a cleared topic is replaced,
        at most once per ``PRESENCE_REPAIR_S``."""
        try:
            status = Status.parse(wire.decode(payload, max_body=0)) if payload else None
        except (wire.WireError, ProtocolError):
            status = None
        if status is not None and status.state == "online" and status.sender == dev.spec.client_id:
            return
        if now - dev.presence_repaired < PRESENCE_REPAIR_S:
            return
        dev.presence_repaired = now
        self.presence_repairs += 1
        log.warning("%s: the broker showed this device as %s while it is connected; published online again",
                    dev.spec.client_id, "offline" if status is not None else "absent or unreadable",
                    extra=fields(device=dev.spec.client_id))
        dev.link.publish(dev.topics.status(dev.spec.client_id), dev.presence(dev.core.status("online")), retain=True)

    def _training_event(self, item: _Trained, now: float) -> Event:
        env = item.outcome.result
        if env is None:
            return TrainingFailed(item.job_id, item.outcome.error, now)
        try:
            delta = tensors.unpack(env.body)
        except tensors.TensorError as exc:
            return TrainingFailed(item.job_id, f"unreadable training result: {exc}", now)
        h = env.header
        done = TrainingDone(item.job_id, delta, int(h["num_samples"]), float(h["loss"]), float(h["seconds"]), now)
        rss = h.get("max_rss_bytes")
        self.last_training = {"seconds": done.seconds, "time": time.time(), "samples": done.num_samples,
                              "max_rss_bytes": rss if isinstance(rss, int) and rss >= 0 else None}
        if self.metrics is not None:
            self.metrics.training_seconds.observe(done.seconds)
        return done

    # --- actions ---------------------------------------------------------------

    def _count_traffic(self, message: bytes, direction: int, nbytes: int, serves_next: bool = False) -> None:
        peeked = wire.peek(message)
        round_ = peeked[1].get("round", 0) if peeked else 0
        round_ = (round_ + 1 if serves_next else round_) if isinstance(round_, int) else 0
        self.traffic.setdefault(round_, [0, 0])[direction] += nbytes
        if len(self.traffic) > TRAFFIC_ROUNDS:
            del self.traffic[min(self.traffic)]

    def _run(self, dev: _Device, event: object) -> None:
        """Hand ``event`` to the device's core and carry out what it returns.
        Contained: a failure is counted (``failures``) and logged the first
        time for each kind, and the device goes on."""
        try:
            for action in dev.core.handle(event):  # type: ignore[arg-type]
                self._execute(dev, action)
        except Exception as exc:
            self._contained(dev.spec.client_id, exc, event)

    def _contained(self, client_id: str, exc: Exception, item: object) -> None:
        kind = (type(item).__name__, type(exc).__name__)
        self.failures[kind] += 1
        if self.failures[kind] == 1:
            log.error("%s: failed to handle %s (counted; repeats are not logged)", client_id, kind[0],
                      exc_info=exc, extra=fields(device=client_id))

    def _execute(self, dev: _Device, action: Action | InstallArtifact) -> None:
        before = dev.link.bytes_out
        self._act(dev, action)
        if dev.link.bytes_out != before and isinstance(action, (PublishUpdate, PublishStatus)):
            self._count_traffic(action.message, 0, dev.link.bytes_out - before)

    def _act(self, dev: _Device, action: Action | InstallArtifact) -> None:
        cid = dev.spec.client_id
        if isinstance(action, InstallArtifact):
            dev.install(action.artifact)
        elif isinstance(action, PersistState):
            dev.store.save(action.state, action.update)
        elif isinstance(action, PersistResidual):
            dev.store.save_residual(action.residual)
        elif isinstance(action, PersistKey):
            dev.store.save_key(action.message, action.digest)
        elif isinstance(action, Subscribe):
            dev.link.subscribe(self._channel_filter(dev, action.channel))
        elif isinstance(action, Unsubscribe):
            dev.link.unsubscribe(self._channel_filter(dev, action.channel))
            dev.downloads.discard(action.channel)
        elif isinstance(action, Refetch):
            # Partial downloads are kept: chunks the broker sends again are
            # duplicates, and a slow link's download still completes.
            dev.link.subscribe(self._channel_filter(dev, action.channel))
        elif isinstance(action, PublishUpdate):
            if dev.silenced(action.message):
                return
            dev.link.publish_chunked(lambda _i: dev.topics.update(cid), dev.sign(action.message))
        elif isinstance(action, PublishStatus):
            dev.link.publish(dev.topics.status(cid), dev.presence(action.message), retain=True)
        elif isinstance(action, StartTraining):
            job_id = action.job.job_id

            def done(outcome: Outcome) -> None:
                self.inbox.put(_Trained(cid, job_id, outcome))

            self.pool.submit(self._request(dev, action.job), done)

    @staticmethod
    def _channel_filter(dev: _Device, channel: str) -> str:
        return dev.topics.key_filter if channel == "key" else dev.topics.delta_filter

    def _request(self, dev: _Device, job: TrainJob) -> bytes:
        header = {
            "model": job.model, "model_args": job.model_args,
            "data": dev.spec.data, "data_args": dev.spec.data_args,
            "plan": job.plan.to_json(), "seed": job.seed,
        }
        return wire.encode(Kind.TRAIN_REQUEST, header, job.model_body)
