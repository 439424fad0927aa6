"""The round lifecycle's rules (``aggregator.lifecycle``)."""

import math

import pytest

from aggregator.lifecycle import TRANSITIONS, Lifecycle, LifecycleError, Phase, Trigger


def test_every_phase_but_done_can_be_left_and_done_is_reached_only_by_finishing():
    sources = {p for p, _ in TRANSITIONS}
    assert sources == set(Phase) - {Phase.DONE}
    assert {t for (_, t), to in TRANSITIONS.items() if to is Phase.DONE} == {Trigger.FINISH}


@pytest.mark.parametrize(("phase", "trigger"), [(p, t) for p in Phase for t in Trigger if (p, t) not in TRANSITIONS])
def test_a_move_the_table_lacks_is_refused(phase, trigger):
    life = Lifecycle(phase=phase)
    with pytest.raises(LifecycleError, match=phase.value):
        life.move(trigger)
    assert life.phase is phase


def test_a_round_settles_opens_closes_by_quorum_and_the_next_one_waits():
    life = Lifecycle()
    assert not life.settled(10.0, settle_s=2.0) and life.phase is Phase.SETTLING
    assert life.next_deadline() == 12.0
    assert life.settled(12.0, settle_s=2.0)
    life.announce(12.0, deadline_s=60.0)
    assert life.phase is Phase.OPEN and life.next_deadline() == 72.0 and life.expired(71.9) is None
    life.await_offline(20.0, grace_s=5.0)
    assert life.next_deadline() == 25.0 and life.expired(24.0) is None and life.expired(25.0) == "quorum"
    life.await_all()
    life.mark_due(30.0)
    life.mark_due(31.0)  # the first time counts
    assert life.next_deadline() == 30.0 and life.expired(30.0) == "quorum"
    life.close()
    life.next_round()
    assert life.phase is Phase.WAITING and life.deadline == math.inf and life.due is None


def test_a_secure_round_unmasks_on_its_stages_deadline_then_closes():
    life = Lifecycle()
    life.announce(0.0, deadline_s=60.0)
    assert life.next_deadline(stage_ends=20.0) == 20.0  # keys or shares end first
    assert life.expired(60.0) == "deadline"
    life.close_inputs("deadline")
    assert life.phase is Phase.UNMASKING and life.closing == "deadline"
    assert life.expired(1e9) is None and life.next_deadline(stage_ends=80.0) == 80.0
    life.close()
    life.next_round()
    assert life.phase is Phase.WAITING


def test_the_budget_stop_finishes_a_settling_job():
    life = Lifecycle()
    life.settled(0.0, settle_s=1.0)
    life.finish()
    assert life.phase is Phase.DONE and life.next_deadline() is None and Phase.DONE.announced == "done"
    assert Phase.SETTLING.announced == "waiting" and Phase.UNMASKING.announced == "open"
