"""Batched local training (``edge_agent.batched``) against ``train_round``,
device by device: the same global model, data, plan and seed must give the
same update.

"The same" is float32 rounding, not bits: the batched products sum in a
different order. Tolerance: the largest absolute difference between a
device's batched and reference deltas is at most ``RTOL`` (1e-5) times the
largest absolute value of its reference delta; the reported loss agrees to
1e-5 relative; ``num_samples`` and ``steps`` are equal. Observed on the
development machine (AMD EPYC, torch 2.13 CPU): at most 2e-6 of the delta's
scale over these tests' plans and models, typically 1e-7 to 1e-6 (mlp and
vmap engines, momentum and FedProx included); the loss to 2e-7 relative.
The loop engine is ``train_round`` itself, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from edge_agent.batched import Unbatchable, choose_engine, iter_train_many, local_steps, train_many
from edge_agent.training import LocalResult, TrainingDiverged, train_round
from fedge import datasets
from fedge.messages import TrainingPlan
from fedge.models import digits_mlp, mnist_2nn, tabular_mlp
from fedge.torchkit import federated_arrays, load_federated

RTOL = 1e-5
LOSS_RTOL = 1e-5

PLANS = [
    TrainingPlan(epochs=1, batch_size=16, lr=0.1),
    TrainingPlan(epochs=2, batch_size=10, lr=0.05, momentum=0.9),
    TrainingPlan(epochs=1, batch_size=32, lr=0.2, weight_decay=1e-3),
    TrainingPlan(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, prox_mu=0.1),
    TrainingPlan(epochs=2, batch_size=10, lr=0.1, prox_mu=0.5, max_steps=9),
    TrainingPlan(epochs=2, batch_size=32, lr=0.1, momentum=0.9, max_steps=5),
]
PLAN_IDS = ["e1b16", "e2b10-mom", "e1b32-wd", "e2b16-mom-wd-prox", "e2b10-prox-max9", "e2b32-mom-max5"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These products are tiny: a second torch thread only spins at barriers
    on a busy machine (several times the CPU); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference(model: nn.Module, global_arrays, data, plan, seeds):
    """train_round device by device, as the worker runs it."""
    out = []
    for d, seed in zip(data, seeds, strict=True):
        load_federated(model, global_arrays)
        try:
            result = train_round(model, d, plan, seed)
        except Exception as exc:
            out.append(exc)
            continue
        local = federated_arrays(model)
        out.append(({k: local[k] - global_arrays[k] for k in local}, result))
    return out


def assert_same_updates(batched, expected) -> float:
    """Every device's outcome matches; returns the worst delta difference
    relative to the delta's scale."""
    assert len(batched) == len(expected)
    worst = 0.0
    for i, (got, want) in enumerate(zip(batched, expected, strict=True)):
        if isinstance(want, Exception):
            assert type(got) is type(want) and str(got) == str(want), (i, got, want)
            continue
        assert not isinstance(got, Exception), (i, got)
        (delta, result), (ref_delta, ref_result) = got, want
        assert isinstance(result, LocalResult)
        assert (result.num_samples, result.steps) == (ref_result.num_samples, ref_result.steps), i
        assert result.loss == pytest.approx(ref_result.loss, rel=LOSS_RTOL, abs=1e-7), i
        assert list(delta) == list(ref_delta)
        scale = max(float(np.abs(v).max()) for v in ref_delta.values())
        for name, v in ref_delta.items():
            assert delta[name].dtype == np.float32 and delta[name].shape == v.shape
            err = float(np.abs(delta[name] - v).max())
            assert err <= RTOL * scale, (i, name, err, scale)
            worst = max(worst, err / scale if scale else 0.0)
    return worst


def assert_bitwise(batched, expected) -> None:
    """The loop engine is train_round itself: the same bits."""
    for got, want in zip(batched, expected, strict=True):
        assert not isinstance(got, Exception) and not isinstance(want, Exception), (got, want)
        assert got[1] == want[1]
        assert list(got[0]) == list(want[0]) and all(np.array_equal(got[0][k], want[0][k]) for k in want[0])


@pytest.fixture(scope="module")
def digits_fleet():
    """scikit-learn digits, Dirichlet split (alpha 0.5) over 5 clients of
    different sizes."""
    data = []
    for c in range(5):
        x, y = datasets.digits(client=c, clients=5)
        data.append((torch.from_numpy(x), torch.from_numpy(y)))
    assert len({len(x) for x, _ in data}) > 1
    return data


@pytest.fixture(scope="module")
def digits_global():
    torch.manual_seed(0)
    return federated_arrays(digits_mlp())


@pytest.mark.parametrize("engine", ["mlp", "vmap"])
@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_digits_dirichlet_clients_get_train_rounds_update(digits_fleet, digits_global, plan, engine):
    seeds = [101, 7, 7, 3, 12345]  # two devices share a seed: their orders still differ by size
    model = digits_mlp()
    expected = reference(model, digits_global, digits_fleet, plan, seeds)
    got = train_many(model, digits_global, digits_fleet, plan, seeds, engine=engine, group_size=3)
    assert_same_updates(got, expected)


@pytest.fixture(scope="module")
def small_2nn():
    """The 2NN's shape (784 inputs, two hidden ReLU layers, 10 classes),
    narrower, on random MNIST-shaped data of uneven sizes: 1 example, fewer
    than a batch, remainders, exact multiples."""
    gen = torch.Generator().manual_seed(5)
    sizes = [1, 7, 20, 23, 40, 61]
    data = [(torch.rand(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]
    torch.manual_seed(1)
    return data, federated_arrays(mnist_2nn(hidden=24))


@pytest.mark.parametrize("engine", ["mlp", "vmap"])
@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_mnist_2nn_shaped_model_on_uneven_random_data(small_2nn, plan, engine):
    data, global_arrays = small_2nn
    seeds = list(range(len(data)))
    model = mnist_2nn(hidden=24)
    expected = reference(model, global_arrays, data, plan, seeds)
    got = train_many(model, global_arrays, data, plan, seeds, engine=engine)
    assert_same_updates(got, expected)


def test_the_2nn_itself_in_the_fedavg_papers_setup():
    """The full 2NN (199,210 parameters), E = 1, B = 10, lr 0.1, on the
    simulator's engine (auto: mlp) and group size."""
    gen = torch.Generator().manual_seed(9)
    data = [(torch.rand(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen))
            for n in (60, 60, 60, 45, 60, 13)]
    torch.manual_seed(9)
    model = mnist_2nn()
    g = federated_arrays(model)
    plan = TrainingPlan(epochs=1, batch_size=10, lr=0.1)
    assert choose_engine(model, plan).engine == "mlp"
    assert_same_updates(train_many(model, g, data, plan, list(range(6))), reference(model, g, data, plan, range(6)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    batch=st.integers(1, 12),
    epochs=st.integers(1, 3),
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    prox_mu=st.sampled_from([0.0, 0.3]),
    max_steps=st.integers(0, 8),
    group_size=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    engine=st.sampled_from(["mlp", "vmap"]),
)
def test_any_sizes_batches_and_plans(sizes, batch, epochs, momentum, weight_decay, prox_mu, max_steps,
                                     group_size, seed, engine):
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]
    torch.manual_seed(seed)
    model = tabular_mlp(in_features=6, hidden=8, classes=3)
    global_arrays = federated_arrays(model)
    plan = TrainingPlan(epochs=epochs, batch_size=batch, lr=0.1, momentum=momentum, weight_decay=weight_decay,
                        prox_mu=prox_mu, max_steps=max_steps)
    seeds = [seed + i for i in range(len(sizes))]
    expected = reference(model, global_arrays, data, plan, seeds)
    got = train_many(model, global_arrays, data, plan, seeds, engine=engine, group_size=group_size)
    assert_same_updates(got, expected)
    assert [r[1].steps for r in got if not isinstance(r, Exception)] == [local_steps(n, plan) for n in sizes]


@pytest.mark.parametrize("engine", ["mlp", "vmap"])
def test_bce_and_mse_losses(engine):
    gen = torch.Generator().manual_seed(2)
    sizes = [5, 13, 30]
    plan = TrainingPlan(epochs=2, batch_size=8, lr=0.1, momentum=0.9, loss="bce")
    bce_data = [(torch.randn(n, 6, generator=gen), torch.randint(0, 2, (n,), generator=gen)) for n in sizes]
    model = tabular_mlp(in_features=6, hidden=8, classes=1)
    g = federated_arrays(model)
    assert_same_updates(train_many(model, g, bce_data, plan, [1, 2, 3], engine=engine),
                        reference(model, g, bce_data, plan, [1, 2, 3]))

    plan = TrainingPlan(epochs=2, batch_size=8, lr=0.05, prox_mu=0.1, loss="mse")
    mse_data = [(torch.randn(n, 6, generator=gen), torch.randn(n, 2, generator=gen)) for n in sizes]
    model = tabular_mlp(in_features=6, hidden=8, classes=2)
    g = federated_arrays(model)
    assert_same_updates(train_many(model, g, mse_data, plan, [1, 2, 3], engine=engine),
                        reference(model, g, mse_data, plan, [1, 2, 3]))


def test_soft_labels_train_on_the_vmap_engine():
    """cross_entropy with class probabilities: not the mlp engine's closed
    form, so auto sends the fleet to vmap (an explicit mlp refuses)."""
    gen = torch.Generator().manual_seed(6)
    data = [(torch.randn(n, 6, generator=gen), torch.softmax(torch.randn(n, 3, generator=gen), dim=1))
            for n in (3, 11)]
    model = tabular_mlp(in_features=6, hidden=8, classes=3)
    g = federated_arrays(model)
    plan = TrainingPlan(epochs=2, batch_size=4, lr=0.1, momentum=0.9)
    assert_same_updates(train_many(model, g, data, plan, [1, 2], engine="vmap"),
                        reference(model, g, data, plan, [1, 2]))
    with pytest.raises(Unbatchable, match="class indices"):
        train_many(model, g, data, plan, [1, 2], engine="mlp")


def test_targets_the_loss_would_broadcast_train_one_by_one():
    """mse of (n, 1) outputs against (n,) targets broadcasts to (n, n) in
    train_round: the batched engines refuse it rather than guess, so auto
    trains it one by one (the same bits) and an explicit vmap raises."""
    gen = torch.Generator().manual_seed(8)
    data = [(torch.randn(n, 6, generator=gen), torch.randn(n, generator=gen)) for n in (5, 9)]
    model = tabular_mlp(in_features=6, hidden=8, classes=1)
    g = federated_arrays(model)
    plan = TrainingPlan(epochs=1, batch_size=4, lr=0.05, loss="mse")
    with pytest.warns(UserWarning, match="target size"):
        expected = reference(model, g, data, plan, [1, 2])
        assert_bitwise(train_many(model, g, data, plan, [1, 2]), expected)
    with pytest.raises(Unbatchable, match="mse"):
        train_many(model, g, data, plan, [1, 2], engine="vmap")
    empty = (torch.zeros(0, 6), torch.zeros(0))
    got = train_many(model, g, [empty], plan, [1], engine="vmap")  # an empty device is no batching matter
    assert isinstance(got[0], ValueError) and "no training examples" in str(got[0])


class _Gated(nn.Module):
    """Not a Sequential, a Tanh and a frozen layer: the vmap engine's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.embed.requires_grad_(False)
        self.gate = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(torch.tanh(self.gate(h)) * h)


def test_any_model_vmap_can_map_over_uses_the_vmap_engine():
    torch.manual_seed(3)
    model = _Gated()
    assert choose_engine(model, TrainingPlan()).engine == "vmap"
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (4, 9, 17)]
    g = federated_arrays(model)
    plan = TrainingPlan(epochs=2, batch_size=4, lr=0.1, momentum=0.9, prox_mu=0.1)
    got = train_many(model, g, data, plan, [5, 6, 7], engine="vmap")
    assert_same_updates(got, reference(model, g, data, plan, [5, 6, 7]))
    for outcome in got:
        assert not isinstance(outcome, Exception)
        assert not np.any(outcome[0]["embed.weight"])  # frozen: trained by no one


@pytest.mark.parametrize(("model", "why"), [
    (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), "buffers"),
    (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)), "dropout"),
])
def test_models_vmap_cannot_batch_train_one_by_one(model, why):
    plan = TrainingPlan(epochs=1, batch_size=4, lr=0.1)
    choice = choose_engine(model, plan)
    assert choice.engine == "loop" and why in choice.reason
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (6, 10)]
    g = federated_arrays(model)
    assert_bitwise(train_many(model, g, data, plan, [1, 2]), reference(model, g, data, plan, [1, 2]))
    for engine in ("mlp", "vmap"):
        with pytest.raises(Unbatchable, match=why):
            train_many(model, g, data, plan, [1, 2], engine=engine)  # type: ignore[arg-type]


def test_adam_trains_one_by_one_bit_for_bit(digits_fleet, digits_global):
    plan = TrainingPlan(epochs=1, batch_size=32, lr=0.01, optimizer="adam")
    assert choose_engine(digits_mlp(), plan).engine == "loop"
    model = digits_mlp()
    assert_bitwise(train_many(model, digits_global, digits_fleet[:2], plan, [1, 2]),
                   reference(model, digits_global, digits_fleet[:2], plan, [1, 2]))


def test_per_device_failures_are_that_devices_outcome(small_2nn):
    """An empty device, one whose data is a Dataset (trains one by one), and a
    diverging fleet: each device gets what train_round gives it."""
    data, g = small_2nn
    model = mnist_2nn(hidden=24)
    plan = TrainingPlan(epochs=1, batch_size=10, lr=0.1)
    mixed = [data[2], (torch.zeros(0, 784), torch.zeros(0, dtype=torch.int64)),
             torch.utils.data.TensorDataset(*data[3]), data[4]]
    got = train_many(model, g, mixed, plan, [1, 2, 3, 4])
    assert_same_updates(got, reference(model, g, mixed, plan, [1, 2, 3, 4]))
    assert isinstance(got[1], ValueError) and "no training examples" in str(got[1])

    # A label the model has no class for fails its group in the batched engine;
    # the group trains one by one, and only that device fails, as train_round does.
    bad = [data[2], (data[3][0], torch.full_like(data[3][1], 10)), data[4]]
    got = train_many(model, g, bad, plan, [1, 2, 3])
    expected = reference(model, g, bad, plan, [1, 2, 3])
    assert isinstance(expected[1], Exception) and not isinstance(expected[0], Exception)
    assert_same_updates(got, expected)

    wild = TrainingPlan(epochs=1, batch_size=10, lr=1e30)
    got = train_many(model, g, data, wild, list(range(len(data))), engine="mlp")
    expected = reference(model, g, data, wild, list(range(len(data))))
    assert [isinstance(e, TrainingDiverged) for e in expected] == [False, False, True, True, True, True]
    assert_same_updates(got, expected)


def test_stream_yields_every_device_once_and_groups_bound_the_stack(small_2nn):
    data, g = small_2nn
    model = mnist_2nn(hidden=24)
    plan = TrainingPlan(epochs=1, batch_size=10, lr=0.1)
    seen = []
    for i, (delta, _) in iter_train_many(model, g, data, plan, list(range(len(data))), group_size=2):  # type: ignore[misc]
        seen.append(i)
        assert delta["0.weight"].base is not None  # a view of the group's buffer, not a copy per device
    assert sorted(seen) == list(range(len(data)))
    with pytest.raises(ValueError, match="seeds"):
        train_many(model, g, data, plan, [1])


def test_local_steps_matches_train_round():
    assert local_steps(60, TrainingPlan(epochs=1, batch_size=10)) == 6
    assert local_steps(61, TrainingPlan(epochs=2, batch_size=10)) == 14
    assert local_steps(61, TrainingPlan(epochs=2, batch_size=10, max_steps=9)) == 9
    assert local_steps(5, TrainingPlan(epochs=3, batch_size=10, max_steps=50)) == 3
    assert local_steps(0, TrainingPlan()) == 0
