"""The admission table's order: where two checks could both speak, the one
the module's docstring names first does (``aggregator.admission``)."""

from aggregator import admission
from tests.unit.builders import acks, make_core, online, send, update


def statuses(actions):
    return [(a.status, a.reason.split(":")[0]) for a in acks(actions)]


def open_core():
    core = make_core(min_clients=3, quorum=1.0)
    core.start(0.0)
    online(core, "a", "b", "c")
    assert core.open is not None
    return core


def test_a_counted_updates_copy_is_a_duplicate_whatever_else_is_wrong_with_it():
    core = open_core()
    assert statuses(send(core, "a", update(core, "a"))) == [("accepted", "")]
    # Redelivered with a stale base and a bad sample count: still "duplicate", never a refusal
    # (which would make the device take back an update that was counted).
    again = update(core, "a", base="0" * 64, samples=0)
    assert statuses(send(core, "a", again)) == [("duplicate", "already counted update u-a")]


def test_identity_is_checked_before_the_round():
    core = open_core()
    # Another device's name in the header, for a round that is not open: the sender is refused first.
    out = send(core, "a", update(core, "b", round=9))
    assert statuses(out) == [("rejected", "sender_mismatch")]
    # A device the core never heard of, for a closed round: unknown, not late.
    assert statuses(send(core, "zz", update(core, "zz", round=0))) == [("rejected", "unknown_sender")]


def test_a_closed_rounds_counted_update_is_a_duplicate_not_late():
    core = open_core()
    for c in ("a", "b", "c"):
        send(core, c, update(core, c))
    assert core.next_round == 2
    assert statuses(send(core, "a", update(core, "a", round=1))) == [("duplicate", "round 1 counted an update from "
                                                                                   "this device")]
    assert statuses(send(core, "a", update(core, "a", round=1, update_id="other")))[0][0] == "duplicate"


def test_every_check_has_a_name_and_admit_runs_them_in_order():
    names = [name for name, _ in admission.CHECKS]
    assert len(names) == len(set(names))
    assert names.index("closed_round") < names.index("counted") < names.index("base_model")
    assert names[:3] == ["job", "sender", "known"]
