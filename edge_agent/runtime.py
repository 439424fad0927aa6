"""The agent's I/O shell: MQTT connections, the state directory, the training
pool and timers around one or many ``AgentCore``s, all on one thread.

A real device runs one agent. A simulated fleet (the demo, benchmarks) runs
many, each with its own MQTT connection and state directory, sharing one
small pool of training workers: the same code path either way.

This module never imports PyTorch; training happens in worker processes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import capabilities
from edge_agent.core import (
    AckArrived,
    Action,
    AgentCore,
    AnnouncementArrived,
    Connected,
    Event,
    ModelArrived,
    PersistState,
    PublishStatus,
    PublishUpdate,
    StartTraining,
    Tick,
    TrainingDone,
    TrainingFailed,
    TrainJob,
)
from edge_agent.pool import Outcome, TrainingPool
from edge_agent.state import DeviceStore
from fedge import tensors, wire
from fedge.chunks import ChunkError, Reassembler
from fedge.config import BrokerSettings
from fedge.mqtt import Inbound, Inbox, LinkDown, LinkUp, MqttLink, monotonic
from fedge.topics import JobTopics, check_id
from fedge.wire import Kind

log = logging.getLogger("fedge.agent")


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
    info: dict[str, Any] = field(default_factory=dict)
    broker: BrokerSettings | None = None  # this device's own credentials; default: the runtime's


@dataclass(frozen=True)
class _Trained:
    client_id: str
    job_id: str
    outcome: Outcome


class _Device:
    def __init__(self, spec: DeviceSpec, broker: BrokerSettings, inbox: Inbox) -> None:
        self.spec = spec
        self.topics = JobTopics(spec.job)
        self.store = DeviceStore(spec.state_dir)
        state, update = self.store.load()
        self.core = AgentCore(
            client_id=spec.client_id, job=spec.job, info=spec.info or capabilities.describe(),
            accepted_model=spec.accepted_model, resend_after_s=spec.resend_after_s,
            state=state, update_bytes=update,
        )
        self.models = Reassembler(
            max_bytes=2 * spec.max_model_bytes, max_message_bytes=spec.max_model_bytes,
            max_partials_per_stream=2, timeout_s=300.0,
            check_ids=False,  # AgentCore verifies the envelope's sha256
        )
        self.link = MqttLink(
            spec.broker or broker, spec.client_id, inbox.put,
            subscriptions=[self.topics.model_filter, self.topics.round, self.topics.ack(spec.client_id)],
            will=(self.topics.status(spec.client_id), self.core.status("offline")),
        )


class AgentRuntime:
    def __init__(self, devices: list[DeviceSpec], broker: BrokerSettings, pool: TrainingPool,
                 tick_s: float = 0.5) -> None:
        for d in devices:
            check_id(d.client_id, "agent id")
        self.inbox = Inbox(maxsize=max(1024, 64 * len(devices)))
        self.devices = {d.client_id: _Device(d, broker, self.inbox) for d in devices}
        self.pool = pool
        self.tick_s = tick_s
        self._stop = threading.Event()

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        for dev in self.devices.values():
            dev.link.start()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for dev in self.devices.values():
            dev.link.stop(final=(dev.topics.status(dev.spec.client_id), dev.core.status("offline")))

    def run(self) -> None:
        """Process events until ``stop()``; call ``start()`` first."""
        next_tick = monotonic() + self.tick_s
        while not self._stop.is_set():
            item = self.inbox.get(timeout=min(0.25, next_tick - monotonic()))
            now = monotonic()
            if item is not None:
                try:
                    self._dispatch(item, now)
                except Exception:  # a bug in one message's handling must not stop the device
                    log.exception("failed to handle %s", type(item).__name__)
            if now >= next_tick:
                next_tick = now + self.tick_s
                for dev in self.devices.values():
                    dev.models.expire(now)
                    self._run(dev, Tick(now))

    # --- events ----------------------------------------------------------------

    def _dispatch(self, item: object, now: float) -> None:
        if isinstance(item, _Trained):
            dev = self.devices[item.client_id]
            self._run(dev, self._training_event(item, now))
            return
        if isinstance(item, LinkUp):
            self._run(self.devices[item.link], Connected(now))
            return
        if isinstance(item, LinkDown):
            log.warning("%s: lost the broker (%s); reconnecting", item.link, item.reason)
            return
        if not isinstance(item, Inbound):
            return
        dev = self.devices[item.link]
        channel, _ = dev.topics.parse(item.topic)
        if not item.payload:
            return  # a cleared retained message
        if channel == "model":
            try:
                message = dev.models.feed("model", item.payload, now)
            except ChunkError as exc:
                log.warning("%s: dropped a model chunk: %s", item.link, exc)
                return
            if message is not None:
                self._run(dev, ModelArrived(message, now))
        elif channel == "round":
            self._run(dev, AnnouncementArrived(item.payload, now))
        elif channel == "ack":
            self._run(dev, AckArrived(item.payload, now))

    def _training_event(self, item: _Trained, now: float) -> Event:
        env = item.outcome.result
        if env is None:
            return TrainingFailed(item.job_id, item.outcome.error, now)
        try:
            delta = tensors.unpack(env.body)
        except tensors.TensorError as exc:
            return TrainingFailed(item.job_id, f"unreadable training result: {exc}", now)
        h = env.header
        return TrainingDone(item.job_id, delta, int(h["num_samples"]), float(h["loss"]), float(h["seconds"]), now)

    # --- actions ---------------------------------------------------------------

    def _run(self, dev: _Device, event: Event) -> None:
        for action in dev.core.handle(event):
            self._execute(dev, action)

    def _execute(self, dev: _Device, action: Action) -> None:
        cid = dev.spec.client_id
        if isinstance(action, PersistState):
            dev.store.save(action.state, action.update)
        elif isinstance(action, PublishUpdate):
            dev.link.publish_chunked(lambda _i: dev.topics.update(cid), action.message)
        elif isinstance(action, PublishStatus):
            dev.link.publish(dev.topics.status(cid), action.message, retain=True)
        elif isinstance(action, StartTraining):
            job_id = action.job.job_id

            def done(outcome: Outcome) -> None:
                self.inbox.put(_Trained(cid, job_id, outcome))

            self.pool.submit(self._request(dev, action.job), done)

    def _request(self, dev: _Device, job: TrainJob) -> bytes:
        header = {
            "model": job.model, "model_args": job.model_args,
            "data": dev.spec.data, "data_args": dev.spec.data_args,
            "plan": job.plan.to_json(), "seed": job.seed,
        }
        return wire.encode(Kind.TRAIN_REQUEST, header, job.model_body)
