"""No single message stops a device for good: a forged far round, a key or
delta with a forged round, an aggregator restored from an older checkpoint
or a job started afresh all leave the device training the real rounds,
while a round it already did is never trained again for the same model."""

import json

import numpy as np
import pytest

from edge_agent.core import (
    AckArrived,
    AgentState,
    AnnouncementArrived,
    Connected,
    DeltaArrived,
    KeyArrived,
    PersistKey,
    PersistState,
    PublishUpdate,
    StartTraining,
    Subscribe,
)
from fedge import wire
from fedge.messages import Ack, Update
from fedge.tensors import state_digest

from .builders import JOB, KEY, ME, ann_msg, delta_msg, key_msg, make, only, train

FORGED = 10**9


def model(i):
    """The global model after round i."""
    return {k: v + i for k, v in KEY.items()}


def digest(i):
    return state_digest(model(i))


def key_of(i):
    """The key cut when round i closed (a full model every round)."""
    return key_msg(model(i), round_=i)[0]


def announce(core, round_, i, now, attempt=1):
    """Round ``round_`` trains from the model of round i; the key it names
    arrives if the device asks for it."""
    message = ann_msg(digest(i), round_=round_, attempt=attempt, key_digest=digest(i))
    acts = core.handle(AnnouncementArrived(message, now))
    if Subscribe("key") in acts:
        acts += core.handle(KeyArrived(key_of(i), now))
    return acts


def started(acts):
    return [(a.job.round, a.job.base_model) for a in only(acts, StartTraining)]


def reborn(acts, key, **kw):
    """A new process from what the last actions persisted."""
    persisted = only(acts, PersistState)[-1]
    core = make(state=AgentState.from_json(persisted.state), update_bytes=persisted.update, **kw)
    core.restore_key(key)
    return core


def test_a_forged_far_round_naming_the_real_model_does_not_stop_the_device():
    core = make()
    core.handle(KeyArrived(key_of(0), 0))
    # One message: the device cannot tell it from a real round and trains once.
    acts = core.handle(AnnouncementArrived(ann_msg(digest(0), round_=FORGED, key_digest=digest(0)), 1))
    assert started(acts) == [(FORGED, digest(0))]
    upd = Update.parse(wire.decode(only(train(core), PublishUpdate)[0].message))
    acts = core.handle(AckArrived(Ack(JOB, FORGED, 1, ME, upd.update_id, "rejected",
                                      f"future_round: round {FORGED} is not open (round 1 is)").encode(), 6))
    core = reborn(acts, key_of(0))  # what it left on disk survives a restart
    # A copy of the forged message is not trained twice.
    assert not only(announce(core, FORGED, 0, 7, attempt=2), (StartTraining, PublishUpdate))
    # The real rounds are trained, including ones naming the same model (a
    # failed round keeps the model), and after a restart.
    assert started(announce(core, 1, 0, 10)) == [(1, digest(0))]
    first = Update.parse(wire.decode(only(train(core, now=11), PublishUpdate)[0].message))
    assert (first.round, first.base_model) == (1, digest(0))
    assert started(announce(core, 2, 0, 20)) == [(2, digest(0))]
    core = reborn(train(core, now=21), key_of(0))
    assert started(announce(core, 3, 3 - 1, 30)) == [(3, digest(2))]


@pytest.mark.parametrize("downlink", ["on_demand", "follow"])
def test_an_aggregator_restored_from_an_older_checkpoint_gets_trained_for(downlink):
    core = make(downlink=downlink)
    for r in (1, 2, 3):
        acts = announce(core, r, r - 1, 10 * r)
        assert started(acts) == [(r, digest(r - 1))]
        acts = train(core, now=10 * r + 1)
    assert core.state.last_round == 3
    # The aggregator's disk went back to its checkpoint after round 1; the
    # device restarts too. The broker now holds that checkpoint's key (round
    # 1, older than the key the device kept), which a follow device receives
    # before the announcement.
    core = reborn(acts, key_of(2), downlink=downlink)
    acts = core.handle(Connected(100))
    if Subscribe("key") in acts:
        acts += core.handle(KeyArrived(key_of(1), 100))
    # Round 2 names the model of round 1 again: this device did exactly that
    # pair, so it does not send a second, different update for it.
    acts = announce(core, 2, 1, 101)
    assert not only(acts, (StartTraining, PublishUpdate))
    # Round 2 failed without it; round 3 from that same model is new to the device.
    acts = announce(core, 3, 1, 200)
    assert started(acts) == [(3, digest(1))]
    upd = Update.parse(wire.decode(only(train(core, now=201), PublishUpdate)[0].message))
    assert (upd.round, upd.base_model) == (3, digest(1))
    assert core.key.digest == digest(1)


def test_a_job_started_afresh_is_trained_from_round_one():
    core = make()
    for r in (1, 2, 3, 4, 5):
        announce(core, r, r - 1, 10 * r)
        train(core, now=10 * r + 1)
    fresh = {k: -v for k, v in KEY.items()}
    fresh_msg, fresh_digest = key_msg(fresh, round_=0)
    acts = core.handle(AnnouncementArrived(ann_msg(fresh_digest, round_=1, key_digest=fresh_digest), 100))
    assert Subscribe("key") in acts
    acts = core.handle(KeyArrived(fresh_msg, 101))
    assert started(acts) == [(1, fresh_digest)] and only(acts, PersistKey)


def test_a_re_announced_round_still_gets_the_kept_bytes_not_a_new_training():
    core = make()
    announce(core, 1, 0, 0)
    sent = only(train(core), PublishUpdate)[0].message
    core.handle(AnnouncementArrived(ann_msg(digest(0), round_=FORGED, selected=("other",)), 6))
    acts = announce(core, 1, 0, 7, attempt=2)
    assert only(acts, PublishUpdate)[0].message == sent and not only(acts, StartTraining)


def test_a_stale_copy_of_a_round_already_done_is_not_trained_again():
    core = make()
    announce(core, 1, 0, 0)
    train(core, now=1)
    announce(core, 2, 0, 2)  # round 1 failed: same model
    train(core, now=3)
    assert not only(announce(core, 1, 0, 4), (StartTraining, PublishUpdate))


def test_a_key_with_a_forged_round_does_not_pin_the_device_to_it():
    core = make(downlink="follow")
    core.handle(Connected(0))
    core.handle(KeyArrived(key_msg(model(0), round_=FORGED)[0], 0))  # real weights, forged round
    assert started(announce(core, 1, 0, 1)) == [(1, digest(0))]
    train(core, now=2)
    # The key cut at round 1 arrives before the announcement naming it.
    assert core.handle(KeyArrived(key_of(1), 3)) == []
    acts = announce(core, 2, 1, 4)
    assert started(acts) == [(2, digest(1))] and only(acts, PersistKey)


def test_a_delta_with_a_forged_round_does_not_pin_the_device_to_it():
    core = make(downlink="follow")
    core.handle(Connected(0))
    core.handle(KeyArrived(key_msg()[0], 0))
    one = {k: v + 0.1 for k, v in KEY.items()}
    two = {k: v - 0.1 for k, v in KEY.items()}
    forged, one_digest = delta_msg(one, round_=FORGED)
    core.handle(DeltaArrived(forged, 1))
    acts = core.handle(AnnouncementArrived(ann_msg(one_digest, round_=2), 2))
    assert started(acts) == [(2, one_digest)]
    train(core, now=3)
    real, two_digest = delta_msg(two, round_=2)
    core.handle(DeltaArrived(real, 4))  # before the announcement naming it
    acts = core.handle(AnnouncementArrived(ann_msg(two_digest, round_=3), 5))
    assert started(acts) == [(3, two_digest)]
    np.testing.assert_allclose(core.current.arrays["w"], two["w"], atol=0.02)


def test_a_state_file_written_with_a_forged_high_water_mark_is_recovered():
    pending = {"round": FORGED, "update_id": "u", "base_model": digest(0), "sent_attempt": 1,
               "acked_attempt": 0, "final": False}
    state = AgentState.from_json({"format": 1, "last_round": FORGED, "pending": pending})
    core = make(state=state, update_bytes=b"forged-round-update")
    core.restore_key(key_of(0))
    assert started(announce(core, 1, 0, 0)) == [(1, digest(0))]


def test_a_round_declined_before_the_upgrade_is_not_trained_after_it():
    core = make(state=AgentState.from_json({"format": 1, "last_round": 4, "pending": None}))
    core.restore_key(key_of(0))
    assert not only(announce(core, 4, 0, 0, attempt=2), StartTraining)
    assert started(announce(core, 5, 0, 1)) == [(5, digest(0))]


def test_the_state_file_stays_small_however_many_rounds_run():
    core = make()
    sizes = []
    for r in range(1, 121):
        announce(core, r, 0, r)
        state = only(train(core, now=r + 0.5), PersistState)[-1].state
        sizes.append(len(json.dumps(state)))
        assert AgentState.from_json(state) == core.state
    assert max(sizes) < 3000  # about 8 kB if every round were kept
