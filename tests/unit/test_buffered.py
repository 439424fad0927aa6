"""Buffered asynchronous aggregation (``aggregator.modes.buffered``): the
round core in ``server.mode = "buffered"``, the device's side of it
(``edge_agent.core``), its staleness weights and its config; and a whole
job over the in-memory broker with redelivery."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.rounds import (
    ClientStatus,
    MessageArrived,
    PublishAnnouncement,
    RoundFinished,
    SaveCheckpoint,
    SaveRoundOpen,
    SendAck,
    TimerFired,
)
from aggregator.staleness import BufferedPolicy
from edge_agent.core import AckArrived, AnnouncementArrived, KeyArrived, PublishUpdate, StartTraining
from edge_agent.pool import TrainingPool
from fedge import wire
from fedge.codecs import make_codec
from fedge.config import ConfigError, updated
from fedge.messages import Ack, Decline, Invite, RoundAnnouncement, Update
from fedge.transport import MemoryBroker
from fedge.wire import Kind

from .builders import (
    INITIAL,
    JOB,
    ME,
    PLAIN,
    ann_msg,
    delta_for,
    devices,
    job,
    job_and_fleet,
    key_msg,
    make,
    make_core,
    only,
    train,
)

POLICY = BufferedPolicy(concurrency=3, buffer_size=2, max_staleness=2)
FLEET = ("a", "b", "c", "d", "e")


def buffered_core(policy: BufferedPolicy = POLICY, **kw):
    return make_core(buffered=policy, defences=PLAIN, **kw)


def invites(actions) -> dict[str, Invite]:
    out = {}
    for a in actions:
        if isinstance(a, SendAck):
            env = wire.decode(a.message)
            if env.kind == Kind.INVITE:
                inv = Invite.parse(env)
                out[inv.client] = inv
    return out


def receipts(actions) -> list[Ack]:
    envs = [wire.decode(a.message) for a in actions if isinstance(a, SendAck)]
    return [Ack.parse(e) for e in envs if e.kind == Kind.ACK]


def announced(actions) -> RoundAnnouncement | None:
    anns = [a for a in actions if isinstance(a, PublishAnnouncement)]
    return RoundAnnouncement.parse(wire.decode(anns[-1].message)) if anns else None


def upd(core, client, task, *, version=None, delta=None, samples=10, update_id=None, base=None):
    version = core.next_round if version is None else version
    body = make_codec(core.codec_params).encode(delta if delta is not None else delta_for(client),
                                                np.random.default_rng(0))
    digest = base or core.mode.digest_of(version) or core.model_digest
    return Update(job=JOB, round=version, sender=client, update_id=update_id or f"u-{client}-{task}",
                  num_samples=samples, codec=core.codec_params, base_model=digest, body=body, task=task).encode()


class Job:
    """A buffered round core, its devices' tasks, and what it published."""

    def __init__(self, core=None, now=0.0):
        self.core = core or buffered_core()
        self.now = now
        self.tasks: dict[str, Invite] = {}
        self.records = []
        self.checkpoint = None
        self.open_record = None
        self.ann = None
        self.run(self.core.start(now))

    def run(self, actions):
        for a in actions:
            if isinstance(a, SaveCheckpoint):
                self.checkpoint = (a.arrays, a.meta)
            elif isinstance(a, SaveRoundOpen):
                self.open_record = a.record
            elif isinstance(a, RoundFinished):
                self.records.append(a.record)
        self.tasks.update(invites(actions))
        self.ann = announced(actions) or self.ann
        return actions

    def online(self, *clients, up=True):
        for c in clients:
            self.run(self.core.handle(ClientStatus(c, up, {}, self.now)))

    def send(self, client, message):
        out = self.run(self.core.handle(MessageArrived(client, message, self.now)))
        return out + self.tick()

    def tick(self, dt=0.0):
        self.now += dt
        return self.run(self.core.handle(TimerFired(self.now)))

    def answer(self, client, **kw):
        inv = self.tasks[client]
        return self.send(client, upd(self.core, client, inv.task, **kw))


def test_the_first_version_waits_for_a_fleet_that_can_fill_a_buffer_then_invites_concurrency_devices():
    j = Job(buffered_core(dataclasses.replace(POLICY, buffer_size=3), min_clients=1))
    j.online("a", "b")
    assert j.ann is not None and j.ann.state == "waiting" and not j.tasks
    j.online("c", "d", "e")
    assert j.ann.state == "open" and j.ann.buffered and j.ann.max_staleness == 2 and j.ann.round == 1
    assert len(j.tasks) == 3 and len({i.task for i in j.tasks.values()}) == 3
    assert all(i.round == 1 and i.model_digest == j.ann.model_digest for i in j.tasks.values())
    assert j.open_record is not None and set(j.open_record["tasks"]) == set(j.tasks)


def test_each_update_is_folded_on_arrival_and_every_buffer_size_makes_a_version():
    j = Job()
    j.online(*FLEET)
    first = set(j.tasks)
    a, b = sorted(first)[:2]
    acts = j.answer(a)
    [ack] = receipts(acts)
    assert (ack.status, ack.round, ack.attempt) == ("accepted", 1, 1)
    assert len(invites(acts)) == 1  # its place goes to another device
    assert not j.records
    acts = j.answer(b)
    assert [r.round for r in j.records] == [1] and j.records[0].status == "ok"
    rec = j.records[0].extra["buffered"]
    assert rec["version"] == 1 and rec["staleness"] == {"0": 2}
    assert j.ann.round == 2 and j.ann.buffered
    # The model moved by the mean of the two updates (FedAvg, plain defences, equal samples).
    expected = {k: INITIAL[k] + (delta_for(a)[k] + delta_for(b)[k]) / 2 for k in INITIAL}
    for k in INITIAL:
        np.testing.assert_allclose(j.core.models.exact[k], expected[k], rtol=1e-5, atol=1e-5)
    # A device whose update is in the version may be asked again: a new task.
    j.run(j.core.mode.top_up(j.now))
    assert sum(1 for t in j.core.mode.tasks.values() if t.holds) == 3


def test_a_stale_update_weighs_less_and_the_denominator_stays():
    """FedBuff's weighting: a stale update is scaled by 1 / (1 + s)^a in
    the sum; the mean still divides by the buffer's sample count."""
    policy = BufferedPolicy(concurrency=4, buffer_size=2, max_staleness=3, staleness="polynomial", exponent=1.0)
    j = Job(buffered_core(policy))
    j.online(*FLEET)
    p, q, r, s = sorted(j.tasks)
    j.answer(p)
    j.answer(q)  # version 1 published; version 2 is built
    before = {k: v.copy() for k, v in j.core.models.exact.items()}
    j.answer(r, version=2)  # trained from the newest model: staleness 0, weight 1
    j.answer(s, version=1)  # trained from the model before: staleness 1, weight 1/2
    assert [rec.extra["buffered"]["staleness"] for rec in j.records] == [{"0": 2}, {"0": 1, "1": 1}]
    expected = {k: before[k] + (delta_for(r)[k] + 0.5 * delta_for(s)[k]) / 2 for k in INITIAL}
    for k in INITIAL:
        np.testing.assert_allclose(j.core.models.exact[k], expected[k], rtol=1e-5, atol=1e-5)


def test_updates_staler_than_max_staleness_get_a_late_receipt_and_free_the_task():
    j = Job(buffered_core(BufferedPolicy(concurrency=3, buffer_size=1, max_staleness=1)))
    j.online(*FLEET)
    old = sorted(j.tasks)[0]
    stuck = sorted(j.tasks)[1]
    j.answer(old)  # version 1
    j.answer(sorted(set(j.tasks) - {old, stuck})[0], version=2)  # version 2
    assert j.core.next_round == 3
    task = j.tasks[stuck].task
    acts = j.answer(stuck, version=1)  # two versions behind
    [ack] = receipts(acts)
    assert ack.status == "late" and "max_staleness" in ack.reason
    # Its task is over (the device may be asked again, for a new one).
    assert j.core.mode.task_of(stuck) != task and j.core.counters["late"] == 1


def test_what_is_refused_before_folding():
    j = Job()
    j.online(*FLEET)
    a, b, c = sorted(j.tasks)
    idle = sorted(set(FLEET) - set(j.tasks))[0]
    cases = {
        "no_task": (idle, upd(j.core, idle, "made-up")),
        "future_round": (a, upd(j.core, a, j.tasks[a].task, version=5)),
        "stale_base": (b, upd(j.core, b, j.tasks[b].task, base="0" * 64)),
    }
    for reason, (client, message) in cases.items():
        [ack] = receipts(j.send(client, message))
        assert ack.status == "rejected" and ack.reason.startswith(reason), (reason, ack)
    assert j.core.counters["accepted"] == 0
    # A device told its update is refused sends no other for that task: its place goes to another.
    assert a not in j.core.mode.tasks and b not in j.core.mode.tasks and c in j.core.mode.tasks
    assert j.core.mode.active() == 3


def test_a_copy_of_a_counted_update_is_a_duplicate_in_the_buffer_and_after_its_version():
    j = Job()
    j.online(*FLEET)
    a, b = sorted(j.tasks)[:2]
    first = upd(j.core, a, j.tasks[a].task)
    assert receipts(j.send(a, first))[0].status == "accepted"
    assert receipts(j.send(a, first))[0].status == "duplicate"  # in the buffer
    j.answer(b)
    assert j.core.next_round == 2
    assert receipts(j.send(a, first))[0].status == "duplicate"  # in version 1
    assert j.core.counters["accepted"] == 2 and j.core.counters["duplicate"] == 2


def test_a_decline_an_offline_device_and_a_silent_one_each_free_a_place():
    j = Job(buffered_core(BufferedPolicy(concurrency=2, buffer_size=2, max_staleness=2)))
    j.online(*FLEET)
    a, b = sorted(j.tasks)
    j.send(a, Decline(JOB, 1, a, "out of memory").encode())
    assert a not in j.core.mode.tasks and j.core.mode.active() == 2 and j.core.counters["declined"] == 1
    j.online(b, up=False)
    assert j.core.mode.active() == 2 and not j.core.mode.tasks[b].holds  # b's task stays: its update is taken
    silent = sorted(c for c, t in j.core.mode.tasks.items() if t.holds)
    j.tick(j.core.policy.deadline_s + 1)
    assert j.core.counters["task_expired"] == 2 and all(c in j.core.roster.benched for c in silent)
    j.online(b)
    assert receipts(j.answer(b))[0].status == "accepted"  # late, but within staleness


def test_a_large_fleet_is_asked_at_random_from_a_sorted_list_kept_until_presence_changes():
    fleet = [f"dev-{i:05d}" for i in range(3000)]
    j = Job(buffered_core(BufferedPolicy(concurrency=20, buffer_size=5, max_staleness=2), min_clients=1))
    j.online(*fleet)
    assert len(j.tasks) == 20 and len(set(j.tasks)) == 20
    roster, codecs = j.core.roster, j.core.mode.codecs()
    listed = roster.sorted_able(codecs)
    assert listed is roster.sorted_able(codecs) and listed == sorted(fleet)  # kept, not sorted again
    j.online("dev-00007", up=False)
    assert "dev-00007" not in roster.sorted_able(codecs) and len(roster.sorted_able(codecs)) == 2999
    # Silent devices are benched; the others are asked first.
    silent = set(j.core.mode.tasks)
    j.tick(j.core.policy.deadline_s + 1)
    assert j.core.counters["task_expired"] == 20
    asked = {c for c, t in j.core.mode.tasks.items() if t.holds}
    assert len(asked) == 20 and not asked & silent


def test_a_copy_of_an_old_decline_does_not_end_the_next_task():
    j = Job(buffered_core(BufferedPolicy(concurrency=1, buffer_size=1, max_staleness=2), min_clients=1))
    j.online("a")
    first = j.tasks["a"].task
    old = Decline(JOB, 1, "a", "stale: trained too long ago", task=first).encode()
    j.send("a", old)
    assert j.tasks["a"].task == first and not j.core.mode.tasks  # it rests, as it would decline again at once
    j.tick(j.core.policy.deadline_s)
    second = j.tasks["a"].task
    assert second != first and j.core.mode.task_of("a") == second
    j.send("a", old)  # redelivered (QoS 1)
    assert j.core.mode.task_of("a") == second and j.core.counters["stray_decline"] == 1


def test_a_restart_loses_no_version_and_folds_the_lost_buffer_once():
    j = Job()
    j.online(*FLEET)
    a, b = sorted(j.tasks)[:2]
    ua, ub = upd(j.core, a, j.tasks[a].task), upd(j.core, b, j.tasks[b].task)
    j.send(a, ua)
    j.send(b, ub)  # version 1 published and checkpointed
    c = sorted(j.core.mode.tasks)[0]
    uc = upd(j.core, c, j.core.mode.tasks[c].id, version=1)
    assert receipts(j.send(c, uc))[0].status == "accepted"  # in the buffer of version 2: lost in the crash
    arrays, meta = j.checkpoint
    model = {k: v.copy() for k, v in j.core.models.exact.items()}
    restarted = buffered_core()
    restarted.restore(arrays, meta, j.open_record)
    r = Job(restarted, now=100.0)
    assert r.ann.round == 2 and r.ann.attempt == 2 and r.ann.buffered
    for k in model:
        np.testing.assert_array_equal(restarted.models.exact[k], model[k])
    r.online(*FLEET)
    # The device whose update was in the lost buffer sends it again (its receipt was for attempt 1): folded once.
    assert receipts(r.send(c, uc))[0].status == "accepted"
    assert receipts(r.send(c, uc))[0].status == "duplicate"
    assert receipts(r.send(a, ua))[0].status == "duplicate"  # in version 1, before the crash


def test_the_checkpoint_says_what_was_counted_and_which_versions_are_kept():
    j = Job()
    j.online(*FLEET)
    a, b = sorted(j.tasks)[:2]
    j.answer(a)
    j.answer(b)
    saved = j.checkpoint[1]["buffered"]
    assert saved["counted"] == {"1": {a: j.tasks[a].task, b: j.tasks[b].task}}
    # The versions whose updates may still come (version 2's model is the checkpoint's own: announced after it).
    assert list(saved["digests"]) == ["1"]


# --- the device -------------------------------------------------------------------------


def buffered_ann(digest, version, attempt=1, state="open", max_staleness=2):
    ann = RoundAnnouncement.parse(wire.decode(ann_msg(digest, round_=version, attempt=attempt, selected=(),
                                                      state=state)))
    return dataclasses.replace(ann, mode="buffered", max_staleness=max_staleness).encode()


def test_a_device_trains_for_a_task_and_keeps_going_when_the_version_moves():
    core = make()
    k, digest = key_msg()
    core.handle(KeyArrived(k, 0.0))
    assert not only(core.handle(AnnouncementArrived(buffered_ann(digest, 1), 1.0)), StartTraining)  # no task
    [start] = only(core.handle(AckArrived(Invite(JOB, 1, 1, ME, digest, task="t1").encode(), 2.0)), StartTraining)
    assert start.job.round == 1
    core.handle(AnnouncementArrived(buffered_ann(digest, 2), 3.0))  # version 2 opens while it trains
    [sent] = only(train(core, now=4.0), PublishUpdate)
    u = Update.parse(wire.decode(sent.message))
    assert (u.round, u.task, u.base_model) == (1, "t1", digest)
    # The same task never trains twice, even invited again (a redelivered invite).
    assert not only(core.handle(AckArrived(Invite(JOB, 2, 1, ME, digest, task="t1").encode(), 5.0)), StartTraining)


def test_a_device_declines_a_task_whose_training_went_too_stale_and_resends_after_a_restart():
    core = make()
    k, digest = key_msg()
    core.handle(KeyArrived(k, 0.0))
    core.handle(AnnouncementArrived(buffered_ann(digest, 1, max_staleness=1), 1.0))
    core.handle(AckArrived(Invite(JOB, 1, 1, ME, digest, task="t1").encode(), 2.0))
    core.handle(AnnouncementArrived(buffered_ann(digest, 3, max_staleness=1), 3.0))
    [sent] = only(train(core, now=4.0), PublishUpdate)
    assert wire.decode(sent.message).kind == Kind.DECLINE and core.counters["stale_training"] == 1
    # A second task: its update is sent, acknowledged for attempt 1, and sent again when the aggregator
    # restarts (attempt 2) while it can still be taken.
    core.handle(AckArrived(Invite(JOB, 3, 1, ME, digest, task="t2").encode(), 5.0))
    [sent] = only(train(core, now=6.0), PublishUpdate)
    u = Update.parse(wire.decode(sent.message))
    core.handle(AckArrived(Ack(JOB, u.round, 1, ME, u.update_id, "accepted").encode(), 7.0))
    [again] = only(core.handle(AnnouncementArrived(buffered_ann(digest, 4, attempt=2, max_staleness=1), 8.0)),
                   PublishUpdate)
    assert again.message == sent.message


# --- weights and settings ---------------------------------------------------------------


def test_staleness_weights():
    poly = BufferedPolicy(1, 1, 10)
    assert poly.weight(0) == 1.0 and poly.weight(3) == pytest.approx(0.5)
    assert BufferedPolicy(1, 1, 10, staleness="constant").weight(9) == 1.0
    hinge = BufferedPolicy(1, 1, 10, staleness="hinge", hinge_after=2, hinge_slope=0.5)
    assert [hinge.weight(s) for s in (0, 2, 4)] == [1.0, 1.0, 0.5]


@pytest.mark.parametrize(("change", "words"), [
    ({"secagg": {"mode": "on", "bound": 0.1}, "selection": {"min_clients": 3}}, "SecAgg+"),
    ({"privacy": {"mode": "central"}}, "privacy.sampling_rate = 0.1 .*set it to 1.*no amplification"),
    ({"privacy": {"mode": "distributed", "sampling_rate": 1.0}, "codec": {"name": "none"}}, "use central"),
    ({"privacy": {"mode": "central", "sampling_rate": 1.0, "clip_quantile": 0.5}}, "clip_quantile"),
    ({"privacy": {"mode": "central", "sampling_rate": 1.0, "min_devices": 7}}, "leave it 0"),
    ({"buffered": {"staleness": "cubic"}}, "buffered.staleness"),
    ({"server": {"mode": "async"}}, "server.mode"),
])
def test_settings_a_buffered_job_cannot_run_are_one_line(change, words):
    cfg = updated(AggregatorConfig(), **{"server": {"mode": "buffered"}, **change})
    if "server" in change:
        cfg = updated(AggregatorConfig(), **change)
    with pytest.raises(ConfigError, match=words):
        cfg.check()


def test_a_private_buffered_job_noises_each_version_and_counts_it_without_amplification():
    from aggregator.privacy import DpPolicy, PrivacySpec, epsilon

    spec = PrivacySpec(1.0, sampling_rate=1.0, delta=1e-5)
    budget = epsilon(spec, 3)
    dp = DpPolicy(spec, clip=0.5, target_epsilon=budget, min_devices=2)
    j = Job(buffered_core(BufferedPolicy(concurrency=3, buffer_size=2, max_staleness=2), privacy=dp))
    j.online(*FLEET)
    assert j.ann.dp is not None and j.ann.dp.clip == 0.5  # the devices clip to it
    for _ in range(6):
        before = {k: v.copy() for k, v in j.core.models.exact.items()}
        a, b = sorted(j.core.mode.tasks)[:2]
        big = {k: v * 100 for k, v in delta_for(a).items()}  # clipped to 0.5 whatever it says
        j.answer(a, version=j.core.next_round, delta=big)
        if j.core.state == "done":
            break
        j.answer(b, version=j.core.next_round)
        rec = j.records[-1]
        assert rec.extra["dp_noise_added"] == pytest.approx(0.5) and rec.extra["sampling_rate"] == 1.0
        assert rec.extra["epsilon"] == pytest.approx(epsilon(spec, len(j.records)), abs=1e-4)
        moved = np.sqrt(sum(float(np.sum((j.core.models.exact[k] - before[k]) ** 2)) for k in INITIAL))
        assert moved < 10  # the clipped mean plus noise of 0.5 / 2 per coordinate, never the 100x update
    # The budget stops the job before the version that would pass it.
    assert [r.round for r in j.records] == [1, 2, 3] and j.core.state == "done"
    assert j.core.counters["budget_stop"] == 1 and j.records[-1].extra["epsilon"] <= budget + 1e-4


# --- a whole job ------------------------------------------------------------------------


def test_a_buffered_job_runs_over_the_memory_broker_through_redelivery(tmp_path):
    broker = MemoryBroker(duplicates=True)  # every QoS 1 message twice
    cfg = updated(job(tmp_path, min_clients=1, deadline_s=60.0), job={"rounds": 4},
                  server={"mode": "buffered"}, buffered={"concurrency": 3, "buffer_size": 2, "max_staleness": 3},
                  training={"epochs": 1, "batch_size": 32, "lr": 0.1})
    records = []
    with job_and_fleet(cfg, broker, devices(tmp_path, 4), TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, _):
        assert service.done.wait(120), (records, service.core.counters)
    assert [r.status for r in records] == ["ok"] * 4 and all(r.clients == 2 for r in records)
    assert [r.extra["buffered"]["version"] for r in records] == [1, 2, 3, 4]
    # Each update folded once though every one arrived twice.
    assert service.core.counters["accepted"] == 8 and service.core.counters["duplicate"] >= 1
    # What an operator's scrape shows of it.
    from aggregator.metrics import render

    families = {f.name: f for f in render(service._metrics_snapshot())}
    staleness = {s.labels.get("le"): s.value for s in families["fedge_buffered_staleness"].samples
                 if s.name.endswith("_bucket")}
    assert staleness["+Inf"] == 8 and staleness["0"] <= staleness["1"] <= staleness["+Inf"]
    assert families["fedge_buffered_concurrency"].samples[0].value == 3


def test_a_private_buffered_job_runs_over_the_memory_broker(tmp_path):
    """The devices clip to the announced clip and the versions carry what
    the job spent (no sampling assumed)."""
    broker = MemoryBroker()
    cfg = updated(job(tmp_path, min_clients=1, deadline_s=60.0), job={"rounds": 3},
                  server={"mode": "buffered"}, buffered={"concurrency": 3, "buffer_size": 2, "max_staleness": 3},
                  privacy={"mode": "central", "clip": 0.5, "noise_multiplier": 0.5, "sampling_rate": 1.0},
                  codec={"name": "int8"}, training={"epochs": 1, "batch_size": 32, "lr": 0.1})
    records = []
    with job_and_fleet(cfg, broker, devices(tmp_path, 4), TrainingPool(size=1, mode="warm", threads=1),
                       on_record=records.append) as (service, fleet):
        assert service.done.wait(120), (records, service.core.counters)
        clipped = sum(d.core.counters.get("dp_clipped", 0) + d.core.counters.get("dp_within_clip", 0)
                      for d in fleet.devices.values())
    assert [r.status for r in records] == ["ok"] * 3
    assert [r.extra["dp_rounds"] for r in records] == [1, 2, 3] and records[-1].extra["sampling_rate"] == 1.0
    assert records[0].extra["epsilon"] < records[1].extra["epsilon"] < records[2].extra["epsilon"]
    assert clipped >= 6  # every update was clipped on its device before it was sent


def test_fedge_status_and_watch_say_versions():
    import io

    from fedge.records import RoundRecord
    from fedge_cli.status import print_table
    from fedge_cli.table import RoundTable

    out = io.StringIO()
    print_table({"job": "j", "aggregator": "online", "devices": {}, "skipped": 0, "unverified": 0, "time": 0.0,
                 "round": {"state": "open", "round": 7, "attempt": 2, "mode": "buffered", "max_staleness": 10}}, out)
    assert out.getvalue().startswith("job j: aggregator online, version 7 being built (buffered; updates up to 10 "
                                     "versions old), 0/0 devices online")
    out = io.StringIO()
    table = RoundTable(out, buffered=True)
    table.header()
    table.row(RoundRecord(round=3, attempt=1, status="ok", closed_by="buffer_full", selected=0, clients=5,
                          declined=0, late=0, rejected={}, num_samples=50, train_loss=None, bytes_up=10, bytes_down=20,
                          seconds=0.5, model_digest="d", extra={"buffered": {"staleness_mean": 1.2,
                                                                             "staleness_max": 3}}))
    lines = out.getvalue().splitlines()
    assert lines[1].split()[:2] == ["version", "updates"] and lines[2].split()[:2] == ["3", "5"]
    assert lines[2].split()[-1] == "1.20/3"


def test_a_job_switched_between_modes_at_a_restart_goes_on():
    """An operator's change of server.mode mid-job: whatever the saved state
    holds, the restarted job opens afresh and publishes the checkpoint's model."""
    j = Job()
    j.online(*FLEET)
    a, b = sorted(j.tasks)[:2]
    j.answer(a)
    j.answer(b)
    arrays, meta = j.checkpoint
    sync = make_core(defences=PLAIN)
    sync.restore(arrays, meta, j.open_record)
    acts = sync.start(50.0)
    for c in FLEET:
        acts += sync.handle(ClientStatus(c, True, {}, 50.0))
    ann = announced(acts)
    assert ann is not None and ann.state == "open" and not ann.buffered and ann.round == 2
    back = buffered_core()
    back.restore(*sync.snapshot(), {"round": 2, "attempt": 1, "selected": list(FLEET), "model_digest": "x"})
    j2 = Job(back, now=60.0)
    j2.online(*FLEET)
    assert j2.ann.buffered and j2.ann.round == 2 and len(j2.core.mode.tasks) == 3


def test_a_device_that_sends_an_update_again_also_trains_for_its_new_task():
    core = make()
    k, digest = key_msg()
    core.handle(KeyArrived(k, 0.0))
    core.handle(AnnouncementArrived(buffered_ann(digest, 1), 1.0))
    core.handle(AckArrived(Invite(JOB, 1, 1, ME, digest, task="t1").encode(), 2.0))
    [sent] = only(train(core, now=3.0), PublishUpdate)
    u = Update.parse(wire.decode(sent.message))
    core.handle(AckArrived(Ack(JOB, u.round, 1, ME, u.update_id, "accepted").encode(), 4.0))
    core.handle(AckArrived(Invite(JOB, 2, 1, ME, digest, task="t2").encode(), 5.0))
    assert core.training is not None and core.training.task == "t2"
    core.training = None  # (its worker died: the task is due again)
    acts = core.handle(AnnouncementArrived(buffered_ann(digest, 2, attempt=2), 7.0))  # the aggregator restarted
    assert only(acts, PublishUpdate) and only(acts, PublishUpdate)[0].message == sent.message  # sent again
    assert only(acts, StartTraining) and core.training.task == "t2"  # and the new task trains meanwhile


def test_a_saved_task_record_that_is_not_well_formed_is_left_out_not_a_crash():
    restarted = buffered_core()
    restarted.resume_round({"mode": "buffered", "round": 1, "attempt": 1, "model_digest": "x",
                            "tasks": {"a": ["t1", 1, True], "b": "junk", "c": ["t2", "one", True], "d": ["t3", 1]}})
    r = Job(restarted, now=5.0)
    assert r.ann.buffered and r.ann.attempt == 2 and set(restarted.mode.tasks) == {"a"}
    other = buffered_core()
    other.resume_round({"mode": "buffered", "attempt": 1, "tasks": ["not", "a", "dict"]})
    assert Job(other, now=6.0).ann.attempt == 2 and not other.mode.tasks
