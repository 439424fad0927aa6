"""Rounds too large to list their devices: the announcement every device
downloads says how many were selected, and each selected device gets an
``Invite`` on its own receipt topic (issue: a round of 9,000 never opened,
its announcement's header past the 64 KiB limit)."""

from aggregator.config import AggregatorConfig
from aggregator.policy import RoundPolicy
from aggregator.rounds import ClientStatus, PublishAnnouncement, SendAck
from edge_agent.core import AckArrived, AnnouncementArrived, KeyArrived, StartTraining
from fedge import wire
from fedge.messages import Invite, RoundAnnouncement
from fedge.wire import Kind

from .builders import JOB, ME, ann_msg, key_msg, make, make_core, online, only, send, update

LIST_MAX = RoundPolicy.from_config(AggregatorConfig()).list_max  # selection.list_max, by default


def _invites(actions):
    out = []
    for a in actions:
        if isinstance(a, SendAck):
            env = wire.decode(a.message)
            if env.kind == Kind.INVITE:
                inv = Invite.parse(env)
                assert inv.client == a.client
                out.append(inv)
    return out


def _announced(actions):
    [msg] = [a.message for a in actions if isinstance(a, PublishAnnouncement)][-1:]
    return RoundAnnouncement.parse(wire.decode(msg)), len(msg)


def _fleet(n):
    return [f"device-{i:05d}" for i in range(n)]


def test_a_round_of_thousands_invites_each_device_and_announces_a_count():
    n = 3000
    core = make_core(min_clients=n)
    acts = online(core, *_fleet(n))
    ann, size = _announced(acts)
    assert ann.state == "open" and ann.selected == () and ann.selected_count == n and ann.by_invitation
    assert size < 2048  # whatever the fleet: no list of thousands for every device to download
    invites = _invites(acts)
    assert sorted(i.client for i in invites) == _fleet(n)
    assert {(i.job, i.round, i.attempt, i.model_digest) for i in invites} == {
        (ann.job, ann.round, ann.attempt, ann.model_digest)}
    assert core.open.bytes_down > n * 100  # the invites are counted in the downlink
    for c in _fleet(n)[:3]:  # invited devices' updates are taken as any selected device's
        send(core, c, update(core, c))
    assert len(core.open.accepted) == 3


def test_a_small_round_lists_its_devices_and_invites_nobody():
    core = make_core(min_clients=LIST_MAX)
    acts = online(core, *_fleet(LIST_MAX))
    ann, _ = _announced(acts)
    assert len(ann.selected) == LIST_MAX and not ann.by_invitation and not _invites(acts)


def test_a_device_that_comes_back_is_invited_again_until_it_answers():
    n = LIST_MAX + 5
    core = make_core(min_clients=n)
    online(core, *_fleet(n))
    c = _fleet(n)[7]
    # Its invite may have been lost with a broker that forgot its session.
    assert [i.client for i in _invites(core.handle(ClientStatus(c, True, {}, 2.0)))] == [c]
    send(core, c, update(core, c), now=3.0)
    assert not _invites(core.handle(ClientStatus(c, True, {}, 4.0)))  # answered: nothing to repeat
    # A broker that lost everything: the aggregator republishes, invites included, for those yet to answer.
    again = _invites(core.republish(5.0))
    assert len(again) == n - 1 and c not in {i.client for i in again}


def test_an_aggregator_restarted_mid_round_invites_for_the_next_attempt():
    n = LIST_MAX + 1
    core = make_core(min_clients=n)
    acts = online(core, *_fleet(n))
    ann, _ = _announced(acts)
    restarted = make_core(min_clients=n)
    restarted.resume_round({"round": ann.round, "attempt": ann.attempt, "selected": _fleet(n),
                            "model_digest": ann.model_digest})
    acts = restarted.start(10.0)
    ann2, _ = _announced(acts)
    assert ann2.attempt == ann.attempt + 1 and ann2.by_invitation
    assert {i.attempt for i in _invites(acts)} == {ann2.attempt} and len(_invites(acts)) == n


# --- the device ---------------------------------------------------------------------


def _invite(digest, round_=1, attempt=1, client=ME, job=JOB):
    return Invite(job, round_, attempt, client, digest).encode()


def _ready_device():
    core = make()
    k, digest = key_msg()
    core.handle(KeyArrived(k, 0.0))
    return core, digest


def test_a_device_trains_a_round_by_invitation_only_once_invited():
    core, digest = _ready_device()
    big = ann_msg(digest, selected=(), selected_count=5000)
    assert not only(core.handle(AnnouncementArrived(big, 1.0)), StartTraining)  # not listed, not invited (yet)
    assert only(core.handle(AckArrived(_invite(digest), 2.0)), StartTraining)


def test_an_invite_before_its_announcement_is_kept_until_it_comes():
    core, digest = _ready_device()
    assert not only(core.handle(AckArrived(_invite(digest), 1.0)), StartTraining)  # no announcement yet
    assert only(core.handle(AnnouncementArrived(ann_msg(digest, selected=(), selected_count=5000), 2.0)),
                StartTraining)


def test_an_invite_to_another_attempt_round_model_or_device_starts_nothing():
    core, digest = _ready_device()
    core.handle(AnnouncementArrived(ann_msg(digest, attempt=2, selected=(), selected_count=5000), 1.0))
    for msg in (_invite(digest, attempt=1), _invite(digest, round_=2, attempt=2), _invite("0" * 64, attempt=2)):
        assert not only(core.handle(AckArrived(msg, 2.0)), StartTraining)
    assert not only(core.handle(AckArrived(_invite(digest, attempt=2, client="someone-else"), 3.0)), StartTraining)
    assert core.counters["bad_invite"] == 1
    assert only(core.handle(AckArrived(_invite(digest, attempt=2), 4.0)), StartTraining)


def test_a_malformed_selected_count_is_refused_at_the_boundary():
    import pytest

    from fedge.messages import ProtocolError

    ann = RoundAnnouncement.parse(wire.decode(ann_msg("d" * 64, selected=("a", "b"))))
    assert ann.selected_count == 2 and not ann.by_invitation
    for bad in (1, -3, "many", True, 10**12):  # fewer than it lists, not a count, absurd
        header = dict(wire.decode(ann_msg("d" * 64, selected=("a", "b"))).header, selected_count=bad)
        with pytest.raises(ProtocolError, match="selected_count"):
            RoundAnnouncement.parse(wire.decode(wire.encode(Kind.ROUND, header)))
