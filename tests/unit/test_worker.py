"""The training worker process and the pool, for real: PyTorch in a child
process, framed envelopes over pipes, crashes that cost one request only."""

import threading

import numpy as np
import pytest

from edge_agent.pool import TrainingPool
from fedge import tensors, wire
from fedge.messages import TrainingPlan
from fedge.wire import Kind


@pytest.fixture(scope="module")
def global_model():
    import torch

    from fedge.torchkit import build_model, federated_arrays

    torch.manual_seed(0)
    return federated_arrays(build_model("fedge.models:digits_mlp"))


def request(global_model, data="fedge.datasets:digits", data_args=None, plan=None, model="fedge.models:digits_mlp"):
    header = {"model": model, "model_args": {}, "data": data,
              "data_args": data_args if data_args is not None else {"client": 0, "clients": 4},
              "plan": (plan or TrainingPlan(epochs=1, batch_size=16, lr=0.1)).to_json(), "seed": 1}
    return wire.encode(Kind.TRAIN_REQUEST, header, tensors.pack(global_model))


def run(pool, req, timeout=120):
    box, done = [], threading.Event()
    pool.submit(req, lambda out: (box.append(out), done.set()))
    assert done.wait(timeout)
    return box[0]


@pytest.fixture(scope="module")
def warm_pool():
    pool = TrainingPool(size=1, mode="warm", threads=1)
    yield pool
    pool.close()


def test_a_round_of_training_returns_a_delta(warm_pool, global_model):
    out = run(warm_pool, request(global_model))
    assert out.error == "" and out.result.kind == Kind.TRAIN_RESULT
    delta = tensors.unpack(out.result.body)
    assert set(delta) == set(global_model)
    assert all(delta[k].shape == global_model[k].shape for k in delta)
    assert any(np.abs(d).max() > 0 for d in delta.values())
    h = out.result.header
    assert h["num_samples"] > 0 and h["loss"] > 0 and h["steps"] >= 1
    assert h["reference_seconds"] == h["seconds"] > 0  # alone, as a batch's items are compared with


def test_training_is_reproducible_for_a_seed(warm_pool, global_model):
    a = tensors.unpack(run(warm_pool, request(global_model)).result.body)
    b = tensors.unpack(run(warm_pool, request(global_model)).result.body)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_user_errors_come_back_as_failures_and_the_worker_lives_on(warm_pool, global_model):
    bad = run(warm_pool, request(global_model, data="nosuch.module:data"))
    assert bad.result is None and "nosuch" in bad.error
    diverge = run(warm_pool, request(global_model, plan=TrainingPlan(lr=1e30, epochs=3)))
    assert diverge.result is None and "lower the learning rate" in diverge.error
    assert run(warm_pool, request(global_model)).error == ""


def test_a_killed_worker_fails_one_request_and_the_pool_recovers(global_model):
    pool = TrainingPool(size=1, mode="warm", threads=1, timeout_s=10)
    try:
        # A data loader that hangs: the pool kills the worker at the timeout.
        hung = run(pool, request(global_model, data="tests.helpers:hang", data_args={"seconds": 60}))
        assert hung.result is None and "killed" in hung.error
        # The fresh worker starts cold (PyTorch, the data): on a loaded
        # machine that alone can take longer than the 10 s the hang was given.
        pool.timeout_s = 600
        assert run(pool, request(global_model)).error == ""
    finally:
        pool.close()


def test_per_round_workers_exit_after_each_request(global_model):
    pool = TrainingPool(size=1, mode="per_round", threads=1)
    try:
        assert run(pool, request(global_model)).error == ""
        assert pool._workers == []
    finally:
        pool.close()
