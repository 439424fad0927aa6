"""Builders the unit tests share, so that no test module imports another:
a round core and the messages it takes (``RoundCore``), an agent core and
the messages it takes (``AgentCore``), and an aggregator service (with a
fleet of agents) on the in-memory transport.

The round core's and the agent core's job is ``JOB``; the services' is
``SHELL_JOB`` (their modules import it as ``JOB``)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.optimizers.fedavg import FedAvg
from aggregator.robust import Defences
from aggregator.rounds import (
    ClientStatus,
    MessageArrived,
    PublishAnnouncement,
    RoundCore,
    RoundFinished,
    RoundPolicy,
    SendAck,
    TimerFired,
)
from aggregator.service import AggregatorService
from edge_agent.core import AgentCore, TrainingDone
from edge_agent.pool import TrainingPool
from edge_agent.runtime import AgentRuntime, DeviceSpec
from fedge import tensors, wire
from fedge.codecs import make_codec
from fedge.config import updated
from fedge.downlink import encode_delta, rebuild
from fedge.messages import Ack, GlobalModel, ModelDelta, RoundAnnouncement, TrainingPlan, Update
from fedge.tensors import TensorSpec, state_digest
from fedge.topics import JobTopics
from fedge.transport import MemoryBroker

# --- the round core (aggregator.rounds) ------------------------------------------

JOB = "unit"
# Plain FedAvg, for tests that compare with a NumPy reference of it (the
# defences have their own tests, tests/unit/test_robust.py).
PLAIN = Defences(clip="off", weight_cap=0.0, direction="off")
INITIAL = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.ones(2, np.float32)}


def make_core(codec="none", downlink=None, key_every=20, **kw):
    policy = dataclasses.replace(RoundPolicy.from_config(AggregatorConfig()),
                                 **{"rounds": 5, "min_clients": 2, "deadline_s": 60.0, "settle_s": 0.0, **kw})
    return RoundCore(job=JOB, policy=policy, plan=TrainingPlan(), codec={"name": codec}, optimizer=FedAvg(),
                     model_factory="fedge.models:digits_mlp", model_args={}, initial_model=INITIAL,
                     downlink=downlink, key_every=key_every)


def online(core, *clients, now=0.0, info=None):
    out = []
    for c in clients:
        out += core.handle(ClientStatus(c, True, info or {}, now))
    return out


def announcement(actions):
    anns = [a for a in actions if isinstance(a, PublishAnnouncement)]
    return RoundAnnouncement.parse(wire.decode(anns[-1].message)) if anns else None


def delta_for(client, scale=1.0):
    seed = sum(map(ord, client))
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in INITIAL.items()}


def update(core, client, *, delta=None, round=None, samples=10, codec=None, base=None, job=JOB, sender=None,
           update_id=None, clip_bit=None):
    delta = delta if delta is not None else delta_for(client)
    params = codec or core.codec_params
    return Update(job=job, round=core.next_round if round is None else round, sender=sender or client,
                  update_id=update_id or f"u-{client}", num_samples=samples, codec=params,
                  base_model=base or core.model_digest,
                  body=make_codec(params).encode(delta, np.random.default_rng(0)), clip_bit=clip_bit).encode()


def send(core, client, message, now=1.0):
    """Deliver a message, then tick as the service does after every event."""
    return core.handle(MessageArrived(client, message, now)) + core.handle(TimerFired(now))


def acks(actions):
    return [Ack.parse(wire.decode(a.message)) for a in actions if isinstance(a, SendAck)]


def finished(actions):
    return [a for a in actions if isinstance(a, RoundFinished)]


def reference_fedavg(model, deltas_and_weights):
    total = sum(w for _, w in deltas_and_weights)
    return {k: model[k] + sum(d[k].astype(np.float64) * w for d, w in deltas_and_weights) / total for k in model}


# --- the agent core (edge_agent.core) ----------------------------------------------

ME = "pi-1"
KEY = {"w": np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "b": np.ones(4, np.float32)}
SPEC = TensorSpec.of(KEY)
DOWN = {"name": "int8", "block": 8}


def key_msg(arrays=KEY, round_=0, factory="fedge.models:digits_mlp", job=JOB):
    msg = GlobalModel(job=job, round=round_, model=factory, model_args={}, spec=TensorSpec.of(arrays),
                      body=tensors.pack(arrays)).encode()
    return msg, state_digest(arrays)


def delta_msg(target, round_=1, key=KEY, tamper=False):
    codec = make_codec(DOWN)
    body = encode_delta(target, key, codec, np.random.default_rng(round_))
    digest = state_digest(rebuild(key, codec, body, SPEC))
    msg = ModelDelta(job=JOB, round=round_, key_round=0, key_digest=state_digest(key),
                     target_digest="0" * 64 if tamper else digest, codec=DOWN, body=body).encode()
    return msg, digest


def ann_msg(model_digest, round_=1, attempt=1, selected=(ME,), state="open", codec=None, key_digest=None, dp=None,
            selected_count=-1):
    return RoundAnnouncement(job=JOB, round=round_, attempt=attempt, state=state, model_digest=model_digest,
                             selected=selected, training=TrainingPlan(), codec=codec or {"name": "int8"},
                             key_digest=key_digest or state_digest(KEY), dp=dp, selected_count=selected_count).encode()


def make(**kw):
    return AgentCore(client_id=ME, job=JOB, info={"codecs": ["none", "int8", "topk"]}, resend_after_s=10.0, **kw)


def only(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


DELTA = {"w": np.full((4, 4), 0.25, np.float32), "b": np.full(4, -0.5, np.float32)}


def train(core, now=5.0, samples=42, delta=None):
    start = core.training
    assert start is not None
    return core.handle(TrainingDone(start.job_id, delta or DELTA, samples, 0.7, 1.2, now))


# --- the services on the in-memory transport (aggregator.service, edge_agent.runtime)

SHELL_JOB = "shell"
TOPICS = JobTopics(SHELL_JOB)


def job(tmp: Path, **selection: object) -> AggregatorConfig:
    # These tests speak the protocol by hand, unsigned (test_signing_shell signs).
    return updated(AggregatorConfig(), job={"name": SHELL_JOB, "rounds": 2, "state_dir": str(tmp / "agg")},
                   selection={"min_clients": 1, "settle_s": 0.0, **selection}, identity={"signing": "off"})


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextmanager
def running(cfg: AggregatorConfig, broker: MemoryBroker) -> Iterator[AggregatorService]:
    service = AggregatorService(cfg, link_factory=broker.link)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(10)


def devices(tmp: Path, n: int) -> list[DeviceSpec]:
    return [DeviceSpec(client_id=f"dev-{i}", job=SHELL_JOB, data="fedge.datasets:digits",
                       data_args={"client": i, "clients": n}, state_dir=tmp / f"dev-{i}", durable=False)
            for i in range(n)]


@contextmanager
def job_and_fleet(cfg, broker: MemoryBroker, specs: list[DeviceSpec], pool: TrainingPool,
                  **service_kw) -> Iterator[tuple[AggregatorService, AgentRuntime]]:
    """The aggregator and the devices, each on its own thread, on ``broker``."""
    service = AggregatorService(cfg, link_factory=broker.link, **service_kw)
    fleet = AgentRuntime(specs, cfg.broker, pool, link_factory=broker.link)
    threads = [threading.Thread(target=service.run, daemon=True), threading.Thread(target=fleet.run, daemon=True)]
    fleet.start()
    for t in threads:
        t.start()
    try:
        yield service, fleet
    finally:
        service.stop()
        fleet.stop()
        for t in threads:
            t.join(10)
        fleet.close()
        pool.close()
