"""Built-in data and the client splits (pure functions of labels and seed)."""

import numpy as np
import pytest

from fedge import datasets


def _check_partition(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_partition_is_an_equal_split():
    parts = datasets.iid_partition(1000, 10, seed=1)
    _check_partition(parts, 1000)
    assert {len(p) for p in parts} == {100}


def test_dirichlet_partition_is_deterministic_skewed_and_covers_everything():
    labels = np.repeat(np.arange(10), 100)
    a = datasets.dirichlet_partition(labels, 10, alpha=0.5, seed=3)
    b = datasets.dirichlet_partition(labels, 10, alpha=0.5, seed=3)
    _check_partition(a, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert min(len(p) for p in a) >= 10
    # Label skew: small alpha concentrates each client on fewer labels.
    def top_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])
    skewed = top_share(datasets.dirichlet_partition(labels, 10, alpha=0.1, seed=3))
    flat = top_share(datasets.dirichlet_partition(labels, 10, alpha=100.0, seed=3))
    assert skewed > 0.4 > 0.2 > flat


def test_shard_partition_reproduces_the_fedavg_non_iid_split():
    labels = np.sort(np.random.default_rng(0).integers(0, 10, 60000))
    parts = datasets.shard_partition(labels, 100, 2, seed=0)
    _check_partition(parts, 60000)
    assert {len(p) for p in parts} == {600}
    assert max(len(np.unique(labels[p])) for p in parts) <= 4


def test_digits_loader_shapes_ranges_and_client_shares():
    x, _y = datasets.digits(split="test")
    assert x.shape[1] == 64 and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    total = sum(len(datasets.digits(client=i, clients=5)[0]) for i in range(5))
    assert total == len(datasets.digits()[0])
    with pytest.raises(ValueError, match="outside"):
        datasets.digits(client=5, clients=5)


def test_breast_cancer_is_standardised():
    x, y = datasets.breast_cancer()
    assert x.shape[1] == 30 and set(np.unique(y)) == {0, 1}
    assert abs(float(x.mean())) < 0.05


def test_mnist_missing_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST file"):
        datasets.mnist(path=str(tmp_path / "none.npz"))
