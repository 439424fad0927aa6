"""Made the checkpoints in this directory once, with the round core as it was
before it was split into a lifecycle, admission and an aggregation pipeline
(commit 9e2dde2). ``tests/unit/test_old_checkpoints.py`` resumes them with
today's code and compares what the next round does with what that code did
(``expected.json``, ``expected_model.safetensors``).

Do not run it again to "refresh" them: a checkpoint made by today's code
proves nothing about one made by an older build. Run it only to add a new
scenario, with the code whose checkpoints it must prove readable:

    python -m tests.unit.checkpoints.make
"""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.privacy import DpPolicy, PrivacySpec
from aggregator.rounds import PublishAnnouncement, RoundFinished, SaveCheckpoint, SaveRoundOpen
from aggregator.state import StateDir
from fedge import tensors, wire
from fedge.messages import RoundAnnouncement
from tests.unit.builders import delta_for, make_core, online, send, update

HERE = Path(__file__).parent
CLIENTS = ("a", "b", "c", "d")
# name -> the policy keys over make_core's (the job defaults: adaptive norm
# bound, weight cap, direction filter), and the rounds before the checkpoint.
SCENARIOS = {
    "defaults": {"min_clients": 4, "quorum": 1.0},
    "private": {"min_clients": 4, "quorum": 1.0,
                "privacy": DpPolicy(PrivacySpec(1.0, sampling_rate=1.0, delta=1e-5), clip=0.5, min_devices=4)},
}
ROUNDS_BEFORE = 4


def policy(name: str) -> dict:
    return {"rounds": 8, **SCENARIOS[name]}


def next_round(core, now: float) -> list:
    """Every client sends its update to the open round: its delta scaled by
    the round, so that the norm history and the direction move."""
    out: list = []
    r = core.open.round
    for i, client in enumerate(CLIENTS):
        # Unequal norms (the bound clips some) and, from d, a pull against a's (the direction filter).
        delta = delta_for("a" if client == "d" else client, scale=(-3.0 if client == "d" else 1.0 + i) / r)
        out += send(core, client, update(core, client, delta=delta, samples=10 + 5 * i), now=now + 0.1 * i)
    return out


def summary(record) -> dict:
    """What the round did, as its JSON record says it (without the times
    and byte counts, which depend on the run)."""
    data = record.to_json()
    keep = ("round", "attempt", "status", "closed_by", "selected", "clients", "declined", "num_samples", "accepted",
            "failure", "norm_bound", "clipped", "weight_capped", "left_out", "model_digest",
            "epsilon", "dp_rounds", "dp_clip", "epsilon_participant", "dp_noise")
    if "epsilon" in data:  # the noise is fresh randomness: the model it made cannot be compared
        keep = tuple(k for k in keep if k != "model_digest")
    return {k: data[k] for k in keep if k in data}


def make(name: str) -> None:
    out = HERE / name
    store = StateDir(out)
    core = make_core(**policy(name))
    now = 0.0
    core.start(now)
    online(core, *CLIENTS, now=now)
    checkpoint = opened = None
    for _ in range(ROUNDS_BEFORE):
        now += 1.0
        for action in next_round(core, now):
            if isinstance(action, SaveCheckpoint):
                checkpoint = action
            elif isinstance(action, SaveRoundOpen):
                opened = action.record
    assert checkpoint is not None and opened is not None and core.open is not None
    store.save_checkpoint(checkpoint.arrays, checkpoint.meta)
    store.save_open_round(opened)
    # What the core of this build does next: resume from the files, as a
    # restarted aggregator would, and run the open round again.
    resumed = resume(name, out)
    actions = resumed.start(now)
    ann = [RoundAnnouncement.parse(wire.decode(a.message)) for a in actions if isinstance(a, PublishAnnouncement)]
    online(resumed, *CLIENTS, now=now)
    fin = [a for a in next_round(resumed, now + 1.0) if isinstance(a, RoundFinished)]
    assert len(fin) == 1, fin
    expected = {"announced": {"round": ann[-1].round, "attempt": ann[-1].attempt, "selected": list(ann[-1].selected),
                              "model_digest": ann[-1].model_digest},
                "record": summary(fin[0].record), "next_round": resumed.next_round,
                "counters": dict(resumed.counters)}
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    if name != "private":  # a private round's noise is fresh randomness: its model cannot be compared
        (out / "expected_model.safetensors").write_bytes(tensors.pack(dict(fin[0].model)))


def resume(name: str, where: Path):
    store = StateDir(where, writable=False)
    loaded = store.load_checkpoint()
    assert loaded is not None
    core = make_core(**policy(name))
    core.restore(*loaded, store.load_open_round())
    return core


if __name__ == "__main__":
    for scenario in SCENARIOS:
        make(scenario)
        print(f"wrote {HERE / scenario}")
