"""The edge agent's protocol core: when it trains, what it sends, when it
resends, and that a restart never causes a second submission."""

import numpy as np

from edge_agent.core import (
    AckArrived,
    AgentCore,
    AgentState,
    AnnouncementArrived,
    Connected,
    ModelArrived,
    PersistState,
    PublishStatus,
    PublishUpdate,
    StartTraining,
    Tick,
    TrainingDone,
    TrainingFailed,
)
from fedge import tensors, wire
from fedge.messages import Ack, Decline, GlobalModel, RoundAnnouncement, Status, TrainingPlan, Update
from fedge.tensors import TensorSpec
from fedge.wire import Kind

JOB = "unit"
ME = "pi-1"
W = {"w": np.ones((2, 2), np.float32)}


def model_msg(round_=0, factory="fedge.models:digits_mlp", scale=1.0, job=JOB):
    arrays = {"w": W["w"] * scale}
    return GlobalModel(job=job, round=round_, model=factory, model_args={}, spec=TensorSpec.of(arrays),
                       body=tensors.pack(arrays)).encode()


def ann_msg(model, round_=1, attempt=1, selected=(ME,), state="open", codec="int8"):
    return RoundAnnouncement(job=JOB, round=round_, attempt=attempt, state=state,
                             model_digest=wire.digest_of(model), selected=selected,
                             training=TrainingPlan(), codec={"name": codec}).encode()


def make(**kw):
    return AgentCore(client_id=ME, job=JOB, info={"codecs": ["none", "int8"]}, resend_after_s=10.0, **kw)


def only(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def train(core, now=5.0, samples=42):
    start = core.training
    assert start is not None
    return core.handle(TrainingDone(start.job_id, {"w": np.full((2, 2), 0.25, np.float32)}, samples, 0.7, 1.2, now))


def selected_core(**kw):
    core = make(**kw)
    m = model_msg()
    core.handle(ModelArrived(m, 0.0))
    acts = core.handle(AnnouncementArrived(ann_msg(m), 1.0))
    return core, m, acts


def test_connect_publishes_presence_with_capabilities():
    acts = make().handle(Connected(0))
    status = Status.parse(wire.decode(only(acts, PublishStatus)[0].message))
    assert status.state == "online" and status.sender == ME and "int8" in status.info["codecs"]


def test_trains_when_selected_and_holding_the_announced_model():
    _core, m, acts = selected_core()
    job = only(acts, StartTraining)[0].job
    assert job.round == 1 and job.base_model == wire.digest_of(m)
    assert job.model == "fedge.models:digits_mlp" and tensors.unpack(job.model_body)["w"].shape == (2, 2)


def test_waits_for_the_model_when_the_announcement_comes_first():
    core = make()
    m = model_msg()
    assert core.handle(AnnouncementArrived(ann_msg(m), 0)) == []
    assert only(core.handle(ModelArrived(m, 1)), StartTraining)
    # An older model does not trigger anything.
    core2 = make()
    core2.handle(AnnouncementArrived(ann_msg(m), 0))
    assert core2.handle(ModelArrived(model_msg(scale=3.0), 1)) == []


def test_not_selected_or_done_means_idle():
    core = make()
    m = model_msg()
    core.handle(ModelArrived(m, 0))
    assert core.handle(AnnouncementArrived(ann_msg(m, selected=("other",)), 1)) == []
    assert core.handle(AnnouncementArrived(ann_msg(m, state="done", selected=()), 2)) == []


def test_update_is_persisted_before_it_is_published_and_carries_the_round_contract():
    core, m, _ = selected_core()
    acts = train(core)
    assert [type(a) for a in acts] == [PersistState, PublishUpdate]
    assert acts[0].update == acts[1].message
    upd = Update.parse(wire.decode(acts[1].message))
    assert (upd.job, upd.round, upd.sender, upd.num_samples) == (JOB, 1, ME, 42)
    assert upd.base_model == wire.digest_of(m) and upd.codec == {"name": "int8"}
    assert acts[0].state["last_round"] == 1 and acts[0].state["pending"]["update_id"] == upd.update_id


def test_resends_the_same_bytes_with_backoff_until_acknowledged():
    core, _m, _ = selected_core()
    sent = only(train(core, now=5.0), PublishUpdate)[0].message
    assert core.handle(Tick(14.9)) == []
    assert only(core.handle(Tick(15.0)), PublishUpdate)[0].message == sent
    assert core.handle(Tick(34.9)) == []  # backoff doubled to 20 s
    assert only(core.handle(Tick(35.0)), PublishUpdate)[0].message == sent
    upd = Update.parse(wire.decode(sent))
    core.handle(AckArrived(Ack(JOB, 1, 1, ME, upd.update_id, "accepted").encode(), 36))
    assert core.handle(Tick(1000)) == []


def test_a_reannounced_round_after_an_aggregator_restart_gets_the_same_bytes_at_once():
    core, m, _ = selected_core()
    sent = only(train(core), PublishUpdate)[0].message
    upd = Update.parse(wire.decode(sent))
    core.handle(AckArrived(Ack(JOB, 1, 1, ME, upd.update_id, "accepted").encode(), 6))
    acts = core.handle(AnnouncementArrived(ann_msg(m, attempt=2), 7))
    assert only(acts, PublishUpdate)[0].message == sent
    assert not only(acts, StartTraining)
    # Acknowledged for attempt 2: quiet again.
    core.handle(AckArrived(Ack(JOB, 1, 2, ME, upd.update_id, "duplicate").encode(), 8))
    assert core.handle(AnnouncementArrived(ann_msg(m, attempt=2), 9)) == []
    assert core.handle(Tick(500)) == []


def test_a_restarted_agent_never_trains_twice_for_a_round():
    core, m, _ = selected_core()
    acts = train(core)
    persisted, sent = acts[0], acts[1].message
    # The process dies here; a new one starts from the persisted state.
    reborn = make(state=AgentState.from_json(persisted.state), update_bytes=persisted.update)
    reborn.handle(ModelArrived(m, 100))
    acts = reborn.handle(AnnouncementArrived(ann_msg(m), 101))
    assert not only(acts, StartTraining)
    assert only(acts, PublishUpdate)[0].message == sent
    # ... and after the receipt, a third incarnation does nothing at all.
    upd = Update.parse(wire.decode(sent))
    acts = reborn.handle(AckArrived(Ack(JOB, 1, 1, ME, upd.update_id, "accepted").encode(), 102))
    third = make(state=AgentState.from_json(only(acts, PersistState)[0].state), update_bytes=sent)
    third.handle(ModelArrived(m, 200))
    assert third.handle(AnnouncementArrived(ann_msg(m), 201)) == []


def test_training_that_outlives_its_round_is_dropped():
    core, _m, _ = selected_core()
    m2 = model_msg(round_=1, scale=2.0)
    core.handle(ModelArrived(m2, 2))
    core.handle(AnnouncementArrived(ann_msg(m2, round_=2, selected=("other",)), 3))
    assert only(train(core), PublishUpdate) == []
    assert core.counters["stale_training"] == 1


def test_failed_training_declines_the_round():
    core, m, _ = selected_core()
    acts = core.handle(TrainingFailed(core.training.job_id, "training worker killed: out of memory", 3))
    dec = wire.decode(only(acts, PublishUpdate)[0].message)
    assert dec.kind == Kind.DECLINE and "out of memory" in Decline.parse(dec).reason
    assert core.handle(AnnouncementArrived(ann_msg(m), 4)) == []  # no retry for round 1


def test_a_rejected_update_is_not_resent():
    core, _m, _ = selected_core()
    upd = Update.parse(wire.decode(only(train(core), PublishUpdate)[0].message))
    core.handle(AckArrived(Ack(JOB, 1, 1, ME, upd.update_id, "rejected", "wrong_shape").encode(), 6))
    assert core.handle(Tick(10_000)) == []
    assert core.counters["update_rejected"] == 1


def test_receipts_for_someone_else_are_ignored():
    core, _m, _ = selected_core()
    upd = Update.parse(wire.decode(only(train(core), PublishUpdate)[0].message))
    assert core.handle(AckArrived(Ack(JOB, 1, 1, "pi-2", upd.update_id, "accepted").encode(), 6)) == []
    assert core.handle(AckArrived(Ack(JOB, 1, 1, ME, "not-mine", "accepted").encode(), 6)) == []
    assert only(core.handle(Tick(15.0)), PublishUpdate)


def test_refuses_models_it_was_not_told_to_run():
    core = make()
    m = model_msg(factory="os:system")
    assert core.handle(ModelArrived(m, 0)) == [] and core.model is None
    assert core.counters["refused_model"] == 1
    allowed = make(accepted_model="mypkg.nets:tiny")
    m2 = model_msg(factory="mypkg.nets:tiny")
    allowed.handle(ModelArrived(m2, 0))
    assert allowed.model is not None


def test_corrupt_or_foreign_models_are_ignored():
    core = make()
    bad = bytearray(model_msg())
    bad[-1] ^= 1
    assert core.handle(ModelArrived(bytes(bad), 0)) == []
    assert core.handle(ModelArrived(model_msg(job="other"), 0)) == []
    assert core.model is None and core.counters["bad_model"] == 2
