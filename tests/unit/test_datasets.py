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


def _tiny_mnist(directory, train=6, test=4):
    """A synthetic mnist.npz with the real file's arrays and dtypes (uint8
    28x28 images, uint8 labels), a few images each."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
              "y_train": (np.arange(train) % 10).astype(np.uint8),
              "x_test": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
              "y_test": (np.arange(test) % 10).astype(np.uint8)}
    np.savez(directory / "mnist.npz", **arrays)
    return arrays


def test_mnist_without_path_or_fedge_data_says_how_to_give_the_file(monkeypatch):
    monkeypatch.delenv("FEDGE_DATA", raising=False)
    with pytest.raises(ValueError, match="MNIST needs its file") as err:
        datasets.mnist()
    message = str(err.value)
    assert "FEDGE_DATA" in message and 'path = "/path/to/mnist.npz"' in message
    assert "x_train, y_train, x_test, y_test" in message and "\n" not in message


def test_mnist_reads_fedge_data_when_no_path_is_given(monkeypatch, tmp_path):
    arrays = _tiny_mnist(tmp_path)
    monkeypatch.setenv("FEDGE_DATA", str(tmp_path))
    x, y = datasets.mnist()
    assert x.shape == (6, 784) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert y.dtype == np.int64 and np.array_equal(y, arrays["y_train"])
    x, y = datasets.mnist(split="test", shape="image")
    assert x.shape == (4, 1, 28, 28) and np.allclose(x[:, 0] * 255, arrays["x_test"])
    # An explicit path wins over FEDGE_DATA.
    other = tmp_path / "other"
    other.mkdir()
    _tiny_mnist(other, train=3)
    assert len(datasets.mnist(path=str(other / "mnist.npz"))[0]) == 3


def test_mnist_missing_file_is_explained(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDGE_DATA", raising=False)
    with pytest.raises(ValueError, match=r"MNIST file .*none\.npz.* not found") as err:
        datasets.mnist(path=str(tmp_path / "none.npz"))
    assert "FEDGE_DATA" in str(err.value) and "path" in str(err.value)
    monkeypatch.setenv("FEDGE_DATA", str(tmp_path))  # a directory without mnist.npz
    with pytest.raises(ValueError, match=r"mnist.npz' \(from FEDGE_DATA\) not found"):
        datasets.mnist()


def test_mnist_file_without_its_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="lacks arrays"):
        datasets.mnist(path=str(tmp_path / "mnist.npz"))
