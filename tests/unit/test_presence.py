"""Presence cannot stall a job: devices that vanish or were never real cost a
round's deadline at most once, and an "offline" never holds a round open
(fault campaign, case 5)."""

from aggregator.rounds import ClientStatus, TimerFired
from tests.unit.builders import acks, announcement, finished, make_core, online, send, update

REAL = ("a", "b", "c")


def test_a_selected_device_that_goes_offline_is_not_waited_for():
    core = make_core(min_clients=3)
    ann = announcement(online(core, *REAL))
    assert ann.selected == REAL
    send(core, "a", update(core, "a"))
    send(core, "b", update(core, "b"))
    assert not finished(core.handle(ClientStatus("c", False, {}, 2.0)) + core.handle(TimerFired(2.0)))
    assert core.next_deadline() == 7.0  # the grace for a device that reconnects at once
    [fin] = finished(core.handle(TimerFired(7.0)))
    assert fin.record.status == "ok" and fin.record.closed_by == "quorum" and fin.record.clients == 2
    assert fin.record.seconds == 7.0  # not the deadline


def test_an_offline_before_any_update_still_lets_the_round_close_on_the_others():
    core = make_core(min_clients=3)
    online(core, *REAL)
    core.handle(ClientStatus("a", False, {}, 0.5))  # forged or true: the same
    send(core, "b", update(core, "b"))
    assert not finished(send(core, "c", update(core, "c"), now=1.5))
    [fin] = finished(core.handle(TimerFired(6.5)))
    assert fin.record.clients == 2 and fin.record.seconds == 6.5


def test_a_device_back_online_is_awaited_again():
    core = make_core(min_clients=3)
    online(core, *REAL)
    core.handle(ClientStatus("c", False, {}, 0.5))
    send(core, "a", update(core, "a"))
    assert not finished(send(core, "b", update(core, "b")))  # grace for c begins
    core.handle(ClientStatus("c", True, {}, 3.0))  # a Wi-Fi blip: back within the grace
    assert not finished(core.handle(TimerFired(10.0)))  # awaited again, up to the deadline
    [fin] = finished(send(core, "c", update(core, "c"), now=11.0))
    assert fin.record.clients == 3


def test_invented_devices_cost_one_deadline_then_sit_out():
    core = make_core(min_clients=3, rounds=4, settle_s=1.0)
    fakes = ("fake1", "fake2")
    online(core, *REAL, *fakes)
    ann = announcement(core.handle(TimerFired(1.0)))
    assert set(fakes) <= set(ann.selected)
    for c in REAL:
        send(core, c, update(core, c))
    closing = core.handle(TimerFired(62.0))
    [fin] = finished(closing)
    assert fin.record.closed_by == "deadline" and fin.record.clients == 3
    assert core.counters["unresponsive"] == 2
    ann2 = announcement(closing)
    assert ann2.round == 2 and ann2.selected == REAL
    actions = []
    for c in REAL:
        actions += send(core, c, update(core, c), now=63.0)
    [fin2] = finished(actions)
    assert fin2.record.closed_by == "quorum" and fin2.record.seconds == 1.0


def test_benched_devices_fill_in_when_the_others_are_too_few():
    core = make_core(min_clients=2, rounds=4)
    online(core, "a", "b")
    send(core, "a", update(core, "a"))
    closing = core.handle(TimerFired(61.0))  # b never answered: benched
    assert "b" in core.roster.benched
    ann = announcement(closing)
    assert ann.selected == ("a", "b")  # without b the round could never open


def test_a_late_update_clears_the_bench():
    core = make_core(min_clients=2, rounds=4)
    online(core, "a", "b")
    late = update(core, "b")
    send(core, "a", update(core, "a"))
    core.handle(TimerFired(61.0))
    assert "b" in core.roster.benched
    [ack] = acks(send(core, "b", late, now=62.0))
    assert ack.status == "late" and "b" not in core.roster.benched


def test_presence_from_ever_more_invented_ids_is_bounded():
    core = make_core(min_clients=2, max_devices=5)
    online(core, *[f"d{i}" for i in range(20)])
    assert len(core.roster.known) == 5 and core.counters["too_many_devices"] == 15


def test_a_refused_update_is_a_response_so_the_round_closes_on_quorum():
    """The poisoning benchmark found every round with a NaN-sending device
    waiting for its deadline: its sender is told "rejected" and never resends."""
    import numpy as np

    from tests.unit.builders import INITIAL

    core = make_core(min_clients=3)
    online(core, *REAL)
    nan = {k: np.full(v.shape, np.nan, np.float32) for k, v in INITIAL.items()}
    [ack] = acks(send(core, "c", update(core, "c", delta=nan)))
    assert ack.status == "rejected"
    send(core, "a", update(core, "a"))
    [fin] = finished(send(core, "b", update(core, "b"), now=2.0))
    assert fin.record.closed_by == "quorum" and fin.record.seconds == 2.0 and fin.record.clients == 2
    assert "c" not in core.roster.benched


def test_the_roster_s_running_count_agrees_with_a_scan_through_any_churn():
    # The round core asks at every presence how many devices could train; the
    # roster keeps that set as presences come and go instead of scanning
    # everyone online, which made a fleet of N announcing itself cost N^2.
    import random

    from aggregator import selection
    from aggregator.roster import Roster

    rng = random.Random(7)
    roster = Roster(max_devices=10_000)
    asks = (("int2",), ("int2", "delta4"), ())
    for step in range(3000):
        client = f"d{rng.randrange(400)}"
        info = rng.choice([{}, {"codecs": ["int2"]}, {"codecs": ["int2", "delta4"]}, {"role": "inference"}])
        roster.heard(client, rng.random() < 0.7, info)
        if rng.random() < 0.05:
            roster.closed(step, rng.sample(sorted(roster.online) or ["x"], 1), set())  # benched for silence
        codecs = rng.choice(asks)
        needed = rng.randrange(1, 200)
        scan = selection.eligible(roster.online, codecs)
        ready = [c for c in scan if roster.benched.get(c, (0, 0))[1] <= step]
        expect = ready if len(ready) >= needed else scan
        assert roster.eligible(codecs, step, needed) == expect
        assert roster.eligible_count(codecs, step, needed) == len(expect)


def test_a_fleet_announcing_itself_costs_linear_work(monkeypatch):
    # A round waiting for 2,000 devices: each presence is one check, not a
    # check of every device online (counted, not timed: deterministic).
    from aggregator import selection

    calls = []
    real = selection.able
    monkeypatch.setattr(selection, "able", lambda info, codecs: calls.append(1) or real(info, codecs))
    n = 2000
    core = make_core(min_clients=n)
    for i in range(n - 1):
        core.handle(ClientStatus(f"d{i:05d}", True, {}, 0.0))
    assert len(calls) <= 2 * n
    ann = announcement(core.handle(ClientStatus(f"d{n - 1:05d}", True, {}, 0.0)) + core.handle(TimerFired(100.0)))
    assert ann.selected_count == n and ann.by_invitation  # too many to list: each is invited
