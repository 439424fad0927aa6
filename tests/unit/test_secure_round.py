"""The aggregator's secure-aggregation stages (aggregator.secure) driven by
devices that speak only SecAggStage messages on the wire: the sum is exact
with dropouts at each stage, stages end at their deadline when a device is
silent, and out-of-turn or repeated messages are refused with a reason."""

import numpy as np
import pytest

from aggregator.secure import SecureRound
from edge_agent.secure import SecureSession
from fedge import wire
from fedge.messages import SecAggStage
from fedge.secagg import SecAggPlan, quantize

JOB, ROUND, ATTEMPT, COUNT = "job", 4, 1, 300
PLAN = SecAggPlan.for_devices(8, 3, 4, 12, 1.0)


def wire_trip(msg):
    return SecAggStage.parse(wire.decode(msg.encode()))


class Device:
    """A device's real side (edge_agent.secure.SecureSession) and its input."""

    def __init__(self, me, x):
        self.me = me
        self.x = x
        self.session = SecureSession(me, JOB, ROUND, ATTEMPT, SecAggPlan.from_json(PLAN.to_json()))
        self.session.input = x  # already integers: the protocol, not the quantizer, is under test here
        self.inbox = {}
        self.replies = {}

    def keys(self):
        return self.session.keys()

    def shares(self):
        return self.replies["keyset"]

    def masked(self):
        return self.session.masked_body()

    def reveal(self):
        return self.replies["survivors"]


def fleet(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {f"d{i}": Device(f"d{i}", quantize(rng.uniform(-1, 1, COUNT), PLAN, rng)) for i in range(n)}


def deliver(devices, messages):
    for m in messages:
        m = wire_trip(m)
        d = devices[m.client]
        d.inbox[m.stage] = m
        reply = d.session.on_stage(m)
        assert not isinstance(reply, str), reply
        d.replies[m.stage] = reply


def run(devices, silent=None, stage_s=10.0):
    """Every stage in turn; ``silent`` maps a stage to the devices that stop
    answering from it on (their stage then ends at its deadline)."""
    silent = {k: set(v) for k, v in (silent or {}).items()}
    gone = set()
    sr = SecureRound(JOB, ROUND, ATTEMPT, tuple(sorted(devices)), PLAN, COUNT, stage_s, now=0.0)
    now = 0.0
    for stage, send in (("keys", Device.keys), ("shares", Device.shares)):
        gone |= silent.get(stage, set())
        for u, d in devices.items():
            if u not in gone and (stage == "keys" or "keyset" in d.inbox):
                assert sr.on_stage(u, wire_trip(send(d))) is None
        out = sr.advance(now)
        if not out and sr.stage not in ("failed",):
            now += stage_s  # someone is silent: the deadline ends the stage
            out = sr.advance(now)
        deliver(devices, out)
    gone |= silent.get("inputs", set())
    for u in sorted(sr.server.sharers - gone):
        assert sr.on_input(u, devices[u].masked()) is None
    deliver(devices, sr.advance(now, inputs_closed=True))
    gone |= silent.get("unmask", set())
    for u in sorted(sr.server.survivors - gone) if sr.stage == "unmask" else ():
        assert sr.on_stage(u, wire_trip(devices[u].reveal())) is None
    if sr.stage == "unmask":
        sr.advance(now)
        if sr.stage == "unmask":
            sr.advance(now + 2 * stage_s)
    return sr


@pytest.mark.parametrize("stage", ["keys", "shares", "inputs", "unmask"])
def test_the_sum_over_the_wire_is_exact_with_two_devices_silent_at_a_stage(stage):
    devices = fleet(seed=len(stage))
    sr = run(devices, {stage: {"d0", "d5"}})
    assert sr.stage == "done", sr.failure
    included = sorted(sr.server.survivors)
    assert included == sorted(set(devices) - ({"d0", "d5"} if stage != "unmask" else set()))
    want = np.zeros(COUNT, np.uint32)
    for u in included:
        want += devices[u].x
    np.testing.assert_array_equal(sr.result(), want & np.uint32(PLAN.mask))


def test_too_many_silent_devices_fail_the_round_and_reveal_nothing():
    devices = fleet()
    sr = run(devices, {"inputs": {f"d{i}" for i in range(6)}})
    assert sr.stage == "failed" and "threshold" in sr.failure
    assert not sr.server.revealed  # nobody was asked to reveal anything


def test_out_of_turn_repeated_and_foreign_messages_are_refused_with_a_reason():
    devices = fleet(4)
    sr = SecureRound(JOB, ROUND, ATTEMPT, tuple(sorted(devices)), PLAN, COUNT, 10.0, now=0.0)
    d = devices["d1"]
    assert sr.on_input("d1", b"") == "secagg_out_of_turn"
    assert sr.on_stage("d1", d.keys()) is None
    other = SecAggStage(JOB, ROUND, ATTEMPT, "d1", "keys", ("d1",), (bytes(64),))
    assert sr.on_stage("d1", other) == "secagg_refused"  # other keys for the same attempt
    assert sr.on_stage("d2", d.keys()) == "secagg_wrong_round"  # d2 passing on d1's message
    stale = SecAggStage(JOB, ROUND, ATTEMPT - 1 or 9, "d1", "keys", ("d1",), (bytes(64),))
    assert sr.on_stage("d1", stale) == "secagg_wrong_round"
    stranger = Device("x9", devices["d0"].x)
    assert sr.on_stage("x9", stranger.keys()) == "secagg_not_selected"
    assert sr.refusals["secagg_wrong_round"] == 2


def test_a_device_refuses_what_comes_out_of_turn_or_for_another_attempt():
    session = SecureSession("d1", JOB, ROUND, ATTEMPT, PLAN)
    early = SecAggStage(JOB, ROUND, ATTEMPT, "d1", "survivors", peers=("d1", "d2", "d3"))
    assert session.on_stage(early) == "secagg_out_of_turn"  # nothing sent yet: reveal nothing
    routed = SecAggStage(JOB, ROUND, ATTEMPT, "d1", "routed", peers=("d1",))
    assert session.on_stage(routed) == "secagg_out_of_turn"  # no keyset yet
    other = SecAggStage(JOB, ROUND, ATTEMPT + 1, "d1", "survivors", peers=("d1",))
    assert session.on_stage(other) == "secagg_wrong_round"
    assert session.masked_body() is None
    session.set_update(np.zeros(COUNT), np.random.default_rng(0))
    assert session.masked_body() is None  # the routed shares are not here yet
    assert SecAggPlan.from_json(PLAN.to_json()) == PLAN
    for bad in ({**PLAN.to_json(), "bits": "8"}, {**PLAN.to_json(), "threshold": 1}, [1]):
        with pytest.raises(ValueError):
            SecAggPlan.from_json(bad)
