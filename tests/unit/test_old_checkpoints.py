"""Checkpoints written by an older build resume with this one and the next
round does what that build did (``tests/unit/checkpoints``: made by the
round core before it was split into a lifecycle, admission and an
aggregation pipeline; see ``make.py`` there)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aggregator.rounds import PublishAnnouncement, RoundFinished
from aggregator.state import StateDir
from fedge import tensors, wire
from fedge.messages import RoundAnnouncement
from tests.unit.builders import online
from tests.unit.checkpoints.make import CLIENTS, HERE, SCENARIOS, next_round, resume, summary


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_an_old_checkpoint_resumes_and_its_round_runs_as_it_did(name):
    where = HERE / name
    expected = json.loads((where / "expected.json").read_text())
    arrays, meta = StateDir(where, writable=False).load_checkpoint()
    core = resume(name, where)
    # Everything the old build saved is read back as it was.
    again, meta_again = core.snapshot()
    assert {k: meta_again.get(k) for k in meta if k != "checkpoint_id"} == \
        {k: v for k, v in meta.items() if k != "checkpoint_id"}
    assert sorted(again) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)

    # The open round is announced again, to the same devices, as its next attempt.
    now = 100.0
    anns = [RoundAnnouncement.parse(wire.decode(a.message)) for a in core.start(now)
            if isinstance(a, PublishAnnouncement)]
    ann = anns[-1]
    assert {"round": ann.round, "attempt": ann.attempt, "selected": list(ann.selected),
            "model_digest": ann.model_digest} == expected["announced"]

    online(core, *CLIENTS, now=now)
    fin = [a for a in next_round(core, now + 1.0) if isinstance(a, RoundFinished)]
    assert len(fin) == 1
    assert summary(fin[0].record) == expected["record"]
    assert core.next_round == expected["next_round"] and dict(core.counters) == expected["counters"]
    model_file = where / "expected_model.safetensors"
    if model_file.exists():
        want = tensors.unpack(model_file.read_bytes())
        assert sorted(want) == sorted(fin[0].model)
        for k, v in want.items():
            np.testing.assert_array_equal(fin[0].model[k], v, err_msg=k)
