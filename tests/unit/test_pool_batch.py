"""Batched training requests (``TRAIN_BATCH``) through a real training
worker pool: one reply per item, each the update the device's own
``TRAIN_REQUEST`` gives, failures that stay with their item, and a worker
that dies or misbehaves mid-batch costing only the items it left
unanswered."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from edge_agent.pool import Outcome, TrainingPool
from fedge import tensors, wire
from fedge.messages import TrainingPlan
from fedge.wire import Kind

# tests/unit/test_batched.py's tolerance: the batched products sum in another
# order than one device's, so deltas agree to float32 rounding.
RTOL = 1e-5
LOSS_RTOL = 1e-5
PLAN = TrainingPlan(epochs=1, batch_size=10, lr=0.1)


def exit_worker(**_kwargs: object) -> None:
    """A data loader that ends its training worker at once, as a crash would."""
    os._exit(3)


def model_arrays(factory: str) -> dict[str, np.ndarray]:
    import torch

    from fedge.torchkit import build_model, federated_arrays

    torch.manual_seed(0)
    return federated_arrays(build_model(factory))


def batch_request(global_arrays, items, model="fedge.models:digits_mlp", plan=PLAN, engine=None) -> bytes:
    header = {"model": model, "model_args": {}, "plan": plan.to_json(), "items": items}
    if engine is not None:
        header["engine"] = engine
    return wire.encode(Kind.TRAIN_BATCH, header, tensors.pack(global_arrays))


def single_request(global_arrays, item, model="fedge.models:digits_mlp", plan=PLAN) -> bytes:
    header = {"model": model, "model_args": {}, "data": item["data"], "data_args": item["data_args"],
              "plan": plan.to_json(), "seed": item["seed"]}
    return wire.encode(Kind.TRAIN_REQUEST, header, tensors.pack(global_arrays))


def digits_items(n: int) -> list[dict]:
    return [{"data": "fedge.datasets:digits", "data_args": {"client": i, "clients": n}, "seed": 100 + i}
            for i in range(n)]


def run(pool, req, timeout=120) -> Outcome:
    box, done = [], threading.Event()
    pool.submit(req, lambda out: (box.append(out), done.set()))
    assert done.wait(timeout)
    return box[0]


def run_batch(pool, req, count, timeout=120) -> dict[int, list[Outcome]]:
    """Every call ``done`` received, by item; checks that each item had
    exactly one. The pool runs a job at a time (size 1), so once a single
    request submitted after the batch is answered, the batch has made all
    the calls it ever will."""
    calls: dict[int, list[Outcome]] = {}
    lock = threading.Lock()

    def done(i: int, outcome: Outcome) -> None:
        with lock:
            calls.setdefault(i, []).append(outcome)

    pool.submit_batch(req, count, done)
    box, after = [], threading.Event()
    pool.submit(b"not a request", lambda out: (box.append(out), after.set()))
    assert after.wait(timeout)
    assert sorted(calls) == list(range(count))
    assert all(len(v) == 1 for v in calls.values()), {i: len(v) for i, v in calls.items() if len(v) != 1}
    return calls


@pytest.fixture(scope="module")
def warm_pool():
    pool = TrainingPool(size=1, mode="warm", threads=1)
    yield pool
    pool.close()


def mnist_items():
    from tests.conftest import mnist_file

    path = str(mnist_file())  # skips without FEDGE_DATA
    sizes = [1, 7, 20, 23, 40, 60, 60, 13, 45, 60, 9, 31]  # uneven: 1 example, remainders, whole batches
    return [{"data": "fedge.datasets:mnist", "data_args": {"path": path, "client": i, "clients": 1000, "limit": n},
             "seed": 7 * i} for i, n in enumerate(sizes)]


@pytest.mark.parametrize(("setup", "engine"), [("mnist_2nn", None), ("digits_mlp", None), ("digits_mlp", "loop")])
def test_a_batch_gives_each_device_its_single_request_update(warm_pool, setup, engine):
    """The 2NN on MNIST shards of uneven sizes, and the digits MLP (no data
    files needed); the loop engine is train_round itself, bit for bit."""
    model, items = (("fedge.models:mnist_2nn", mnist_items()) if setup == "mnist_2nn"
                    else ("fedge.models:digits_mlp", digits_items(12)))
    g = model_arrays(model)
    calls = run_batch(warm_pool, batch_request(g, items, model=model, engine=engine), len(items))
    for i, item in enumerate(items):
        got = calls[i][0]
        assert got.error == "" and got.result is not None and got.result.kind == Kind.TRAIN_RESULT, (i, got.error)
        want = run(warm_pool, single_request(g, item, model=model))
        assert want.error == "" and want.result is not None
        h, ref = got.result.header, want.result.header
        assert h["index"] == i
        assert (h["num_samples"], h["steps"]) == (ref["num_samples"], ref["steps"])
        assert h["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL, abs=1e-7)
        assert h["seconds"] > 0 and h["reference_seconds"] > 0 and h["max_rss_bytes"] > 0
        assert ref["reference_seconds"] == ref["seconds"] > 0
        delta, ref_delta = tensors.unpack(got.result.body), tensors.unpack(want.result.body)
        assert set(delta) == set(ref_delta) == set(g)
        scale = max(float(np.abs(v).max()) for v in ref_delta.values())
        assert scale > 0
        for name, v in ref_delta.items():
            assert delta[name].dtype == np.float32 and delta[name].shape == v.shape
            assert float(np.abs(delta[name] - v).max()) <= (0 if engine == "loop" else RTOL * scale), (i, name)
    # reference_seconds: one step's seconds alone, times the device's steps.
    per_step = {calls[i][0].result.header["reference_seconds"] / calls[i][0].result.header["steps"]
                for i in calls}
    assert max(per_step) == pytest.approx(min(per_step), rel=1e-9)


def test_a_device_whose_data_fail_fails_alone(warm_pool):
    g = model_arrays("fedge.models:digits_mlp")
    items = digits_items(6)
    items[1]["data_args"] = {"client": 99, "clients": 6}
    items[4]["data_args"] = {"nonsense": 1}
    calls = run_batch(warm_pool, batch_request(g, items), len(items))
    assert "client index 99" in calls[1][0].error and calls[1][0].result is None
    assert "rejected its arguments" in calls[4][0].error and calls[4][0].result is None
    for i in (0, 2, 3, 5):
        assert calls[i][0].error == "" and calls[i][0].result.header["index"] == i
    # A plan that diverges: each device's own TRAIN_ERROR, as train_round words it.
    wild = run_batch(warm_pool, batch_request(g, digits_items(3), plan=TrainingPlan(lr=1e30, epochs=3)), 3)
    assert all("lower the learning rate" in wild[i][0].error for i in range(3))


@pytest.mark.parametrize(("change", "named"), [
    ({"items": "all of them"}, "items must be a list"),
    ({"items": {"0": {}}}, "items must be a list"),
    ({"seed": "x"}, "item 2: seed must be an integer"),
    ({"data_args": [1]}, "item 2: data_args must be an object"),
    ({"extra": 1}, "item 2 has unknown fields ['extra']"),
    ({"engine": "turbo"}, "engine 'turbo'"),
    ({"plan": {"lr": "fast"}}, "training plan field 'lr'"),
    ({"model": 5}, "model must be a module:callable"),
    ({"body": b"not tensors"}, "TensorError"),
])
def test_a_malformed_batch_fails_every_item_naming_the_problem(warm_pool, change, named):
    g = model_arrays("fedge.models:digits_mlp")
    items = digits_items(4)
    header = {"model": "fedge.models:digits_mlp", "model_args": {}, "plan": PLAN.to_json(), "items": items}
    body = tensors.pack(g)
    key, value = next(iter(change.items()))
    if key in ("seed", "data_args", "extra"):
        items[2][key] = value
    elif key == "body":
        body = value
    else:
        header[key] = value
    calls = run_batch(warm_pool, wire.encode(Kind.TRAIN_BATCH, header, body), 4)
    for i in range(4):
        assert calls[i][0].result is None and named in calls[i][0].error, (i, calls[i][0].error)


def test_submit_batch_refuses_what_is_plainly_not_a_batch_of_count(warm_pool):
    g = model_arrays("fedge.models:digits_mlp")
    with pytest.raises(ValueError, match="3 items, not 4"):
        warm_pool.submit_batch(batch_request(g, digits_items(3)), 4, lambda i, out: None)
    with pytest.raises(ValueError, match="not TRAIN_REQUEST"):
        warm_pool.submit_batch(single_request(g, digits_items(1)[0]), 1, lambda i, out: None)
    with pytest.raises(ValueError, match="at least one"):
        warm_pool.submit_batch(batch_request(g, digits_items(3)), 0, lambda i, out: None)


def test_a_worker_that_dies_mid_batch_fails_what_it_left(warm_pool):
    g = model_arrays("fedge.models:digits_mlp")
    items = digits_items(5)
    items[1]["data"] = "nosuch.module:data"  # answered (an error) before the worker dies
    items[3]["data"] = "tests.unit.test_pool_batch:exit_worker"
    calls = run_batch(warm_pool, batch_request(g, items), 5)
    assert "nosuch" in calls[1][0].error
    for i in (0, 2, 3, 4):
        assert calls[i][0].result is None and "exited with code 3" in calls[i][0].error, (i, calls[i][0])
    # A fresh worker serves the next request.
    assert run(warm_pool, single_request(g, digits_items(1)[0])).error == ""


FAKE_WORKER = """
import sys, time
from edge_agent.worker import read_frame, write_frame
from fedge import wire
from fedge.wire import Kind

inp, out = sys.stdin.buffer, sys.stdout.buffer
while (frame := read_frame(inp)) is not None:
    try:
        env = wire.decode(frame)
    except wire.WireError as exc:
        write_frame(out, wire.encode(Kind.TRAIN_ERROR, {"error": str(exc)}))
        continue
    for kind, index in env.header["replies"]:  # the test's script of replies
        if kind == "hang":
            time.sleep(60)
        header = {"index": index} if kind == "result" else {"index": index, "error": "no"}
        write_frame(out, wire.encode(Kind.TRAIN_RESULT if kind == "result" else Kind.TRAIN_ERROR, header))
"""


@pytest.fixture
def stand_in_pool(tmp_path):
    """A pool whose worker is a stand-in (no PyTorch, quick to start) that
    replies what each request's ``replies`` say: [kind, index] pairs,
    ``hang`` to stop answering."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    python.chmod(0o755)
    pool = TrainingPool(size=1, mode="warm", python=str(python), timeout_s=60)
    for _ in range(500):  # the warm worker starts in the pool's thread
        if pool._workers:
            break
        time.sleep(0.01)
    yield pool
    pool.close()


def scripted(count, replies) -> bytes:
    return wire.encode(Kind.TRAIN_BATCH, {"items": [{}] * count, "replies": replies})


@pytest.mark.parametrize(("replies", "answered", "bad"), [
    ([["result", 0], ["result", 0], ["result", 1]], {0}, "item index 0 repeated"),
    ([["error", 1], ["result", 7]], {1}, "item index 7 out of range"),
    ([["result", 2], ["error", -1]], {2}, "item index -1 out of range"),
    ([["result", "0"]], set(), "item index '0' out of range"),
])
def test_a_bad_reply_fails_the_remaining_items_and_the_worker_is_replaced(stand_in_pool, caplog, replies, answered,
                                                                         bad):
    """A worker that repeats an index or sends one out of range: the items
    it answered keep their outcome, the rest fail once, the worker is killed
    (what else it would send is unknown) and the next request gets a fresh
    one."""
    first = stand_in_pool._workers[0]
    calls = run_batch(stand_in_pool, scripted(3, replies), 3)
    for i in range(3):
        if i in answered:
            assert "bad reply" not in calls[i][0].error
        else:
            assert calls[i][0].result is None and f"bad reply: {bad}" in calls[i][0].error, calls[i][0]
    assert sum("bad reply" in r.message for r in caplog.records) == 1  # logged once
    calls = run_batch(stand_in_pool, scripted(1, [["result", 0]]), 1)
    assert calls[0][0].result is not None
    assert not first.alive() and first not in stand_in_pool._workers


def test_the_timeout_bounds_the_whole_batch(stand_in_pool):
    stand_in_pool.timeout_s = 1
    calls = run_batch(stand_in_pool, scripted(3, [["result", 1], ["hang", 0]]), 3)
    assert calls[1][0].result is not None
    for i in (0, 2):
        assert calls[i][0].result is None and "killed" in calls[i][0].error and "timeout_s=1" in calls[i][0].error
    stand_in_pool.timeout_s = 60
    assert run_batch(stand_in_pool, scripted(1, [["error", 0]]), 1)[0][0].error == "no"


def test_the_data_of_a_large_batch_do_not_evict_the_cache():
    from edge_agent.worker import _Cache

    cache = _Cache(2)
    cache.get("a", lambda: 1)
    cache.get("b", lambda: 2)
    assert cache.get("c", lambda: 3, evict=False) == 3
    assert list(cache.items) == ["a", "b"]
    cache.items.pop("a")
    cache.get("c", lambda: 3, evict=False)
    assert list(cache.items) == ["b", "c"]
