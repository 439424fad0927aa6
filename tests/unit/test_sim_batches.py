"""How the simulator cuts its devices' trainings into batched requests
(``edge_agent.sim.fleet._batches``): every device once, in order, and every
batch's header within the wire's limit, however long the devices' data
arguments are."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from edge_agent.sim import fleet
from fedge import wire


def _members(n: int, path_len: int, seed: int = 0) -> list[Any]:
    return [(SimpleNamespace(spec=SimpleNamespace(data="mnist", data_args={
        "path": "/" + "d" * path_len, "client": k, "clients": n})), SimpleNamespace(seed=seed + k))
        for k in range(n)]


def test_short_items_fill_batches_up_to_the_device_count():
    members = _members(1200, 10)
    batches = list(fleet._batches(members))
    assert [len(b) for b in batches] == [fleet.MAX_BATCH, fleet.MAX_BATCH, 1200 - 2 * fleet.MAX_BATCH]
    assert [m for b in batches for m, _ in b] == members


def test_long_data_arguments_make_smaller_batches_whose_header_fits():
    # 512 devices of this size were a 68 KB header: the wire refused the
    # batch and its devices never trained.
    members = _members(1500, 60, seed=2**62)
    batches = list(fleet._batches(members))
    assert len(batches) > 3 and all(0 < len(b) < fleet.MAX_BATCH for b in batches)
    assert [m for b in batches for m, _ in b] == members
    for b in batches:
        header = {"model": "mnist_2nn", "model_args": {}, "plan": {"epochs": 1}, "items": [item for _, item in b]}
        wire.encode(wire.Kind.TRAIN_BATCH, header, b"")  # raises past the limit
