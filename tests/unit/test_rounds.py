"""The aggregator's round state machine: quorum, deadline, duplicates, late and
hostile updates, restarts. No network, no sleeps: time is an argument."""

import numpy as np
import pytest

from aggregator.metrics import incident_counts
from aggregator.rounds import (
    MessageArrived,
    PublishAnnouncement,
    PublishDelta,
    PublishModel,
    SaveCheckpoint,
    SaveRoundOpen,
    TimerFired,
)
from fedge import tensors, wire
from fedge.codecs import make_codec
from fedge.downlink import rebuild
from fedge.messages import MODEL_UNAVAILABLE, Decline, GlobalModel, ModelDelta
from tests.unit.builders import (
    INITIAL,
    JOB,
    PLAIN,
    acks,
    announcement,
    delta_for,
    finished,
    make_core,
    online,
    reference_fedavg,
    send,
    update,
)


def test_waits_for_min_clients_then_announces_with_a_saved_selection():
    core = make_core(min_clients=3)
    start = core.start(0.0)
    assert isinstance(start[0], PublishModel)
    assert announcement(start).state == "waiting"
    assert online(core, "a", "b") == []
    acts = online(core, "c")
    kinds = [type(a) for a in acts]
    assert kinds.index(SaveRoundOpen) < kinds.index(PublishAnnouncement)
    ann = announcement(acts)
    assert ann.state == "open" and ann.round == 1 and set(ann.selected) == {"a", "b", "c"}
    key = GlobalModel.parse(wire.decode(start[0].message))
    assert ann.model_digest == ann.key_digest == tensors.state_digest(tensors.unpack(key.body))


def test_selection_settles_so_a_burst_of_presence_is_seen_whole():
    core = make_core(min_clients=2, settle_s=2.0)
    core.start(0)
    assert online(core, "a", "b", now=10.0) == []  # enough, but more may be arriving
    online(core, "c", now=10.5)
    assert core.handle(TimerFired(11.9)) == [] and core.next_deadline() == 12.0
    ann = announcement(core.handle(TimerFired(12.0)))
    assert set(ann.selected) == {"a", "b", "c"}
    # The next round follows the close at once: nobody is missing.
    send(core, "a", update(core, "a"), now=13)
    send(core, "b", update(core, "b"), now=13)
    assert announcement(send(core, "c", update(core, "c"), now=13)).round == 2


def test_selection_takes_a_fraction_with_a_minimum_and_is_seeded():
    clients = [f"d{i:02d}" for i in range(20)]
    picks = []
    for _ in range(2):
        core = make_core(fraction=0.1, min_clients=3)
        core.start(0)
        acts = online(core, *clients)
        picks.append(announcement(acts).selected)
    assert len(picks[0]) == 3 and picks[0] == picks[1]


def test_full_round_applies_the_weighted_average_then_checkpoints_before_announcing():
    core = make_core()
    core.start(0)
    online(core, "a", "b")
    d_a, d_b = delta_for("a"), delta_for("b")
    out_a = send(core, "a", update(core, "a", delta=d_a, samples=30))
    assert [k.status for k in acks(out_a)] == ["accepted"]
    out_b = send(core, "b", update(core, "b", delta=d_b, samples=10), now=2.5)
    kinds = [type(a) for a in out_b]
    assert kinds.index(SaveCheckpoint) < kinds.index(PublishModel) < kinds.index(PublishAnnouncement)
    fin = finished(out_b)[0]
    ref = reference_fedavg(INITIAL, [(d_a, 30), (d_b, 10)])
    for k in ref:
        np.testing.assert_allclose(fin.model[k], ref[k], rtol=1e-5, atol=1e-6)
    assert fin.record["clients"] == 2 and fin.record["num_samples"] == 40 and fin.record["seconds"] == 2.5
    assert fin.record["accepted"] == ["a", "b"]
    model = GlobalModel.parse(wire.decode(next(a for a in out_b if isinstance(a, PublishModel)).message))
    assert model.round == 1
    assert announcement(out_b).round == 2


def test_int8_round_matches_reference_within_quantization_error():
    core = make_core(codec="int8")
    core.start(0)
    online(core, "a", "b")
    send(core, "a", update(core, "a", samples=5))
    fin = finished(send(core, "b", update(core, "b", samples=15)))[0]
    ref = reference_fedavg(INITIAL, [(delta_for("a"), 5), (delta_for("b"), 15)])
    step = max(np.abs(delta_for(c)[k]).max() / 127 for c in "ab" for k in INITIAL)
    for k in ref:
        assert np.abs(fin.model[k] - ref[k]).max() <= step


def test_a_duplicate_is_acknowledged_but_counted_once():
    core = make_core(min_clients=3, defences=PLAIN)
    core.start(0)
    online(core, "a", "b", "c")
    msg = update(core, "a")
    assert acks(send(core, "a", msg))[0].status == "accepted"
    assert acks(send(core, "a", msg))[0].status == "duplicate"
    # A different update for the same round from the same client is also refused.
    again = update(core, "a", delta=delta_for("zz"), update_id="other")
    assert acks(send(core, "a", again))[0].status == "duplicate"
    send(core, "b", update(core, "b", samples=10))
    fin = finished(send(core, "c", update(core, "c", samples=10)))[0]
    ref = reference_fedavg(INITIAL, [(delta_for("a"), 10), (delta_for("b"), 10), (delta_for("c"), 10)])
    for k in ref:
        np.testing.assert_allclose(fin.model[k], ref[k], rtol=1e-5, atol=1e-6)
    assert fin.record["clients"] == 3 and core.counters["duplicate"] == 2


HOSTILE = {
    "garbage": lambda core: b"\x00garbage",
    "truncated": lambda core: update(core, "a")[:-7],
    "wrong_job": lambda core: update(core, "a", job="other"),
    "sender_mismatch": lambda core: update(core, "a", sender="b"),
    "future_round": lambda core: update(core, "a", round=core.next_round + 3),
    "stale_base": lambda core: update(core, "a", base="0" * 64),
    "wrong_codec": lambda core: update(core, "a", codec={"name": "int8"}),
    "bad_samples_zero": lambda core: update(core, "a", samples=0),
    "bad_samples_huge": lambda core: update(core, "a", samples=10**9),
    "nan": lambda core: update(core, "a", delta={k: np.full(v.shape, np.nan, np.float32) for k, v in INITIAL.items()}),
    "wrong_shape": lambda core: update(
        core, "a", delta={"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_updates_are_dropped_counted_and_the_round_goes_on(case):
    core = make_core()
    core.start(0)
    online(core, "a", "b")
    out = send(core, "a", HOSTILE[case](core))
    assert not finished(out)
    assert sum(core.counters.values()) >= 1 and core.counters["accepted"] == 0
    assert all(a.status in ("rejected", "late") for a in acks(out))
    send(core, "a", update(core, "a"))
    fin = finished(send(core, "b", update(core, "b")))[0]
    assert fin.record["status"] == "ok" and fin.record["clients"] == 2
    assert sum(fin.record["rejected"].values()) == 1


def test_unknown_and_unselected_senders_are_refused():
    core = make_core(fraction=0.5, min_clients=2)
    core.start(0)
    acts = online(core, "a", "b", "c", "d")
    selected = announcement(acts).selected
    outsider = next(c for c in "abcd" if c not in selected)
    assert acks(send(core, outsider, update(core, outsider)))[0].reason.startswith("not_selected")
    assert acks(send(core, "zed", update(core, "zed")))[0].reason.startswith("unknown_sender")
    assert core.counters["not_selected"] == 1 and core.counters["unknown_sender"] == 1


def test_deadline_closes_with_what_arrived_and_late_updates_are_refused():
    core = make_core(min_clients=3, deadline_s=10)
    core.start(0)
    online(core, "a", "b", "c", now=100.0)
    send(core, "a", update(core, "a"), now=101)
    send(core, "b", update(core, "b"), now=102)
    assert core.handle(TimerFired(109.9)) == []
    out = core.handle(TimerFired(110.0))
    rec = finished(out)[0].record
    assert rec["status"] == "ok" and rec["clients"] == 2 and rec["closed_by"] == "deadline"
    late = update(core, "c", round=1)
    assert acks(send(core, "c", late, now=111))[0].status == "late"
    assert core.counters["late"] == 1


def test_a_resend_of_a_folded_update_after_the_close_is_a_duplicate_not_late():
    """Its receipt was lost: "late" would make the device take the update back
    into its residual and send its content a second time."""
    core = make_core(min_clients=2)
    online(core, "a", "b")
    first = update(core, "a")
    send(core, "a", first)
    assert finished(send(core, "b", update(core, "b")))
    [ack] = acks(send(core, "a", first, now=2.0))
    assert ack.status == "duplicate" and ack.round == 1 and core.counters["late"] == 0


def test_a_round_without_enough_updates_fails_and_the_job_moves_on():
    core = make_core(min_clients=2, deadline_s=5, min_updates=2)
    core.start(0)
    online(core, "a", "b")
    digest = core.model_digest
    send(core, "a", update(core, "a"), now=1)
    out = core.handle(TimerFired(5.0))
    rec = finished(out)[0].record
    assert rec["status"] == "failed" and core.model_digest == digest
    assert announcement(out).round == 2 and not any(isinstance(a, PublishModel) for a in out)
    assert core.counters["rounds_failed"] == 1


def test_quorum_closes_early_over_selection():
    core = make_core(min_clients=4, quorum=0.5)
    core.start(0)
    online(core, "a", "b", "c", "d")
    assert not finished(send(core, "a", update(core, "a")))
    rec = finished(send(core, "b", update(core, "b")))[0].record
    assert rec["clients"] == 2 and rec["selected"] == 4 and rec["closed_by"] == "quorum"


def test_the_last_receipt_leaves_before_the_round_closes():
    # The close (optimizer, downlink encoding, checkpoint) waits for the next
    # tick, so the device that completed the quorum is not kept waiting.
    core = make_core()
    core.start(0)
    online(core, "a", "b")
    send(core, "a", update(core, "a"), now=3.0)
    out = core.handle(MessageArrived("b", update(core, "b"), 4.0))
    assert [a.status for a in acks(out)] == ["accepted"] and len(out) == 1
    assert core.state == "open" and core.next_deadline() == 4.0
    fin = finished(core.handle(TimerFired(4.5)))
    assert fin[0].record["closed_by"] == "quorum" and fin[0].record["clients"] == 2
    assert core.next_round == 2


def test_declines_count_as_responses():
    core = make_core()
    core.start(0)
    online(core, "a", "b")
    send(core, "a", update(core, "a"))
    out = send(core, "b", Decline(JOB, 1, "b", "out of memory").encode())
    rec = finished(out)[0].record
    assert rec["clients"] == 1 and rec["declined"] == 1 and rec["status"] == "ok"


def test_a_device_that_declines_and_then_answers_counts_once():
    # A device that lacked the model declines, fetches it again and sends an
    # update: one answer, not two, or the round closes before the others.
    core = make_core(min_clients=3, quorum=1.0)
    core.start(0)
    online(core, "a", "b", "c")
    send(core, "a", Decline(JOB, 1, "a", f"{MODEL_UNAVAILABLE}: delta lost").encode())
    assert [x.status for x in acks(send(core, "a", update(core, "a"), now=2.0))] == ["accepted"]
    assert not finished(send(core, "b", update(core, "b"), now=3.0))
    assert core.state == "open"
    rec = finished(send(core, "c", update(core, "c"), now=4.0))[0].record
    assert rec["clients"] == 3 and rec["closed_by"] == "quorum"


def test_the_job_ends_after_its_rounds():
    core = make_core(rounds=2)
    core.start(0)
    online(core, "a", "b")
    for _r in (1, 2):
        send(core, "a", update(core, "a"))
        out = send(core, "b", update(core, "b"))
    assert finished(out)[0].last and announcement(out).state == "done" and core.state == "done"
    assert acks(send(core, "a", update(core, "a", round=2)))[0].status == "duplicate"  # round 2 counted a
    assert acks(send(core, "a", update(core, "a", round=1, update_id="other")))[0].status == "duplicate"


def test_clients_without_the_job_codec_are_not_selected():
    core = make_core(codec="int8", min_clients=2)
    core.start(0)
    online(core, "old", info={"codecs": ["none"]})
    online(core, "a", "b", info={"codecs": ["none", "int8"]})
    assert core.open is not None and set(core.open.selected) == {"a", "b"}


def test_clients_that_cannot_decode_the_downlink_are_not_selected():
    core = make_core(codec="int8", downlink={"name": "int4", "block": 64, "lossless": "zlib"}, min_clients=2)
    core.start(0)
    online(core, "no-zlib", info={"codecs": ["int4", "int8"]})
    online(core, "a", "b", info={"codecs": ["int4", "int8", "lossless:zlib"]})
    assert core.open is not None and set(core.open.selected) == {"a", "b"}


def _restart(core, **kw):
    arrays, meta = core.snapshot()
    fresh = make_core(**kw)
    open_record = {"round": core.next_round, "attempt": core.attempt, "selected": list(core.open.selected),
                   "model_digest": core.model_digest} if core.open else None
    fresh.restore({k: v.copy() for k, v in arrays.items()}, meta, open_record)
    return fresh


def test_restart_mid_round_reannounces_the_same_round_and_counts_each_update_once():
    core = make_core(defences=PLAIN)
    core.start(0)
    online(core, "a", "b")
    send(core, "a", update(core, "a"))
    send(core, "b", update(core, "b"))  # round 1 closes and is checkpointed
    round1 = {k: v.copy() for k, v in core.models.exact.items()}
    msg_a = update(core, "a", samples=7)
    send(core, "a", msg_a)  # folded into round 2's sum, then the process dies
    _arrays, meta = core.snapshot()
    assert meta["next_round"] == 2
    fresh = _restart(core, defences=PLAIN)
    out = fresh.start(50.0)
    ann = announcement(out)
    assert ann.round == 2 and ann.attempt == 2 and set(ann.selected) == {"a", "b"}
    # The agent resends the same bytes; the new sum counts it once.
    assert acks(fresh.handle(MessageArrived("a", msg_a, 51)))[0].status == "accepted"
    assert acks(fresh.handle(MessageArrived("a", msg_a, 52)))[0].status == "duplicate"
    fin = finished(send(fresh, "b", update(fresh, "b", samples=3), 53))[0]
    ref = reference_fedavg(round1, [(delta_for("a"), 7), (delta_for("b"), 3)])
    for k in ref:
        np.testing.assert_allclose(fin.model[k], ref[k], rtol=1e-5, atol=1e-6)


def test_restart_refuses_another_jobs_checkpoint():
    core = make_core()
    arrays, meta = core.snapshot()
    meta["job"] = "someone-else"
    with pytest.raises(ValueError, match="job"):
        make_core().restore(arrays, meta, None)


def test_checkpoint_detects_damaged_tensors():
    core = make_core()
    arrays, meta = core.snapshot()
    arrays["global/w"] = arrays["global/w"] + 1
    with pytest.raises(ValueError, match="damaged"):
        make_core().restore(arrays, meta, None)


def test_model_message_round_trips_through_tensors():
    core = make_core()
    model = GlobalModel.parse(wire.decode(core.start(0)[0].message))
    arrays = tensors.unpack(model.body)
    for k in INITIAL:
        np.testing.assert_array_equal(arrays[k], INITIAL[k])
    assert model.spec.num_params == 8


DOWN = {"name": "int8", "block": 8}


def test_a_lossy_downlink_publishes_keys_and_deltas_and_the_server_model_stays_exact():
    core = make_core(downlink=DOWN, key_every=3, rounds=6, defences=PLAIN)
    core.start(0)
    online(core, "a", "b")
    exact = {k: v.astype(np.float64) for k, v in INITIAL.items()}
    for r in range(1, 7):
        base = core.model_digest
        send(core, "a", update(core, "a", samples=10))
        out = send(core, "b", update(core, "b", samples=10))
        for k in exact:  # clients' deltas apply to the exact model, not the lossy one
            exact[k] = exact[k] + (delta_for("a")[k] + delta_for("b")[k]) / 2
            np.testing.assert_allclose(core.models.exact[k], exact[k], rtol=1e-5, atol=1e-5)
        ann = announcement(out)
        keys = [a for a in out if isinstance(a, PublishModel)]
        deltas = [a for a in out if isinstance(a, PublishDelta)]
        if r % 3 == 0:  # a key round: the full model, and the old delta cleared
            assert keys and deltas == [PublishDelta(None)] and ann.model_digest == ann.key_digest
            assert GlobalModel.parse(wire.decode(keys[0].message)).round == r
        else:
            assert not keys and deltas[0].message is not None
            d = ModelDelta.parse(wire.decode(deltas[0].message))
            assert d.key_digest == ann.key_digest and d.target_digest == ann.model_digest != base
            # What a device rebuilds hashes to the announced digest.
            rebuilt = rebuild(core.models.key, make_codec(d.codec), d.body, core.spec)
            assert tensors.state_digest(rebuilt) == ann.model_digest
            step = max(np.abs(exact[k] - core.models.key[k]).max() for k in exact) / 127
            assert max(np.abs(rebuilt[k] - exact[k]).max() for k in exact) <= step + 1e-6


def test_updates_must_build_on_the_published_model():
    core = make_core(downlink=DOWN, key_every=5)
    core.start(0)
    online(core, "a", "b")
    send(core, "a", update(core, "a"))
    send(core, "b", update(core, "b"))  # round 2 trains from key + delta
    exact_digest = tensors.state_digest(core.models.exact)
    assert exact_digest != core.model_digest
    wrong = update(core, "a", base=exact_digest)
    assert acks(send(core, "a", wrong))[0].reason.startswith("stale_base")


def test_restart_restores_key_delta_and_exact_model():
    core = make_core(downlink=DOWN, key_every=5)
    core.start(0)
    online(core, "a", "b")
    for _ in range(2):
        send(core, "a", update(core, "a"))
        send(core, "b", update(core, "b"))
    fresh = _restart(core)  # restarted with the downlink switched off: the stored delta still rebuilds
    assert fresh.model_digest == core.model_digest and fresh.models.key_digest == core.models.key_digest
    for k in INITIAL:
        np.testing.assert_array_equal(fresh.models.exact[k], core.models.exact[k])
    out = fresh.start(100)
    delta = next(a for a in out if isinstance(a, PublishDelta))
    assert delta.message == core.models.delta_message


def test_incidents_the_shell_reports_are_counted_and_checkpointed():
    from aggregator.rounds import Incident

    core = make_core()
    assert core.handle(Incident("chunk_overflow", "a", 0.0)) == []
    core.handle(Incident("chunk_overflow", "b", 1.0))
    core.handle(Incident("bad_status", None, 2.0))
    assert core.counters["chunk_overflow"] == 2 and core.counters["bad_status"] == 1
    assert core.snapshot()[1]["counters"]["chunk_overflow"] == 2


def test_injected_ids_make_checkpoints_deterministic():
    ids = iter(["first", "second"])
    core = make_core()
    core.new_id = lambda: next(ids)
    assert core.snapshot()[1]["checkpoint_id"] == "first"
    assert core.snapshot()[1]["checkpoint_id"] == "second"


def test_an_update_with_a_mistyped_header_field_gets_a_counted_rejection_and_a_receipt():
    from fedge.messages import Update as _Update
    from fedge.wire import Kind

    core = make_core()
    core.start(0.0)
    online(core, "a", "b")
    good = _Update.parse(wire.decode(update(core, "a")))
    header = {"job": JOB, "round": good.round, "sender": "a", "update_id": "u-a", "num_samples": 10,
              "codec": good.codec, "base_model": good.base_model, "train_seconds": "fast"}
    receipts = acks(send(core, "a", wire.encode(Kind.UPDATE, header, good.body)))
    assert [(r.status, r.update_id) for r in receipts] == [("rejected", "u-a")]
    assert "train_seconds" in receipts[0].reason
    assert core.counters["malformed"] == 1 and core.counters["accepted"] == 0


# --- a model the broker lost (issue 26, item 1) -----------------------------------


def test_a_device_lacking_the_model_makes_the_aggregator_publish_it_again_once_an_attempt():
    core = make_core(min_clients=3, downlink={"name": "int8", "block": 8}, min_updates=2)
    core.start(0.0)
    online(core, "a", "b", "c")
    assert core.open is not None
    r = core.next_round

    def decline(client, now):
        msg = Decline(JOB, r, client, "model_unavailable: no delta from key round 0 to model abc").encode()
        return send(core, client, msg, now)

    acts = decline("a", 1.0)
    assert [type(a) for a in acts if isinstance(a, (PublishModel, PublishDelta))] == [PublishModel, PublishDelta]
    assert not [a for a in decline("b", 2.0) if isinstance(a, (PublishModel, PublishDelta))]  # once an attempt
    assert core.counters["model_unavailable"] == 2 and core.counters["model_republished"] == 1
    acts = send(core, "c", update(core, "c"), 3.0)  # all answered: the round closes, one update < min_updates
    rec = finished(acts)[0].record
    assert rec["status"] == "failed" and rec.failure == "model_unavailable"
    # A failed round publishes the model again for the next one.
    assert any(isinstance(a, PublishModel) for a in acts) and any(isinstance(a, PublishDelta) for a in acts)
    assert core.failures["model_unavailable"] == 1
    # The metrics show two devices' declines as incidents and one failed round.
    snap = {"counters": dict(core.counters), "rejections": dict(core.rejections), "failures": dict(core.failures)}
    assert incident_counts(snap)["model_unavailable"] == 2 and snap["failures"] == {"model_unavailable": 1}


def test_every_failed_round_names_its_reason_and_republishes_the_delta():
    core = make_core(min_clients=2, min_updates=2)
    core.start(0.0)
    online(core, "a", "b")
    acts = core.handle(TimerFired(61.0))  # nobody answered: deadline
    rec = finished(acts)[0].record
    assert rec["status"] == "failed" and rec.failure == "too_few_updates"
    assert any(isinstance(a, PublishModel) for a in acts)  # nothing arrived: maybe no one had the model
    assert any(isinstance(a, PublishDelta) for a in acts)


def test_republish_gives_what_the_broker_should_hold():
    core = make_core(min_clients=2, downlink={"name": "int8", "block": 8})
    core.start(0.0)
    online(core, "a", "b")
    acts = core.republish(5.0)
    assert [type(a) for a in acts] == [PublishModel, PublishDelta, PublishAnnouncement]
    ann = announcement(acts)
    assert ann.state == "open" and set(ann.selected) == {"a", "b"} and ann.round == 1


def test_a_close_that_raises_abandons_its_round_and_the_job_goes_on(monkeypatch):
    core = make_core(min_clients=2)
    core.start(0.0)
    online(core, "a", "b")
    history = core.defence_history
    real = history.recorded
    calls = []

    def broken(combined):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in a stage")
        return real(combined)

    monkeypatch.setattr(history, "recorded", broken)
    send(core, "a", update(core, "a"), now=1.0)
    out = send(core, "b", update(core, "b"), now=2.0)  # closes round 1: the stage raises
    assert not finished(out) and core.counters["internal_error"] == 1
    assert core.next_round == 2 and core.open is not None and core.open.round == 2  # not stalled
    assert announcement(out).round == 2
    send(core, "a", update(core, "a"), now=3.0)
    rec = finished(send(core, "b", update(core, "b"), now=4.0))[0].record
    assert rec["round"] == 2 and rec["status"] == "ok"
