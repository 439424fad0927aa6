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


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """No FEDGE_DATA, and a user cache of the test's own (XDG_CACHE_HOME)."""
    monkeypatch.delenv("FEDGE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fedge"


def test_the_data_directory_is_fedge_data_else_the_user_cache(monkeypatch, tmp_path, no_data):
    assert datasets.data_dir() == (no_data, "XDG_CACHE_HOME")
    assert datasets.data_file("mnist") == no_data / "mnist.npz"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.data_dir() == (tmp_path / "home" / ".cache" / "fedge", "the user cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert datasets.data_dir()[0] == tmp_path / "home" / ".cache" / "fedge"
    monkeypatch.setenv("FEDGE_DATA", str(tmp_path / "data"))
    assert datasets.data_dir() == (tmp_path / "data", "FEDGE_DATA")
    with pytest.raises(datasets.DataError, match="ships with scikit-learn"):
        datasets.data_file("digits")
    with pytest.raises(datasets.DataError, match="no built-in data set is called 'cifar'"):
        datasets.data_file("cifar")


def test_mnist_without_its_file_says_how_to_get_it_in_one_line(no_data):
    with pytest.raises(ValueError, match=r"MNIST file .* not found") as err:
        datasets.mnist()
    message = str(err.value)
    assert str(no_data / "mnist.npz") in message and "XDG_CACHE_HOME" in message
    assert "run `fedge data fetch mnist` or set FEDGE_DATA" in message and "\n" not in message


def test_mnist_reads_fedge_data_else_the_user_cache(monkeypatch, tmp_path, no_data):
    no_data.mkdir(parents=True)
    cached = _tiny_mnist(no_data, train=5)
    x, y = datasets.mnist()
    assert x.shape == (5, 784) and np.array_equal(y, cached["y_train"])
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


def test_mnist_missing_file_is_explained(monkeypatch, tmp_path, no_data):
    with pytest.raises(ValueError, match=r"MNIST file .*none\.npz.* \(the path given\) not found") as err:
        datasets.mnist(path=str(tmp_path / "none.npz"))
    assert "correct the path" in str(err.value) and "fedge data fetch mnist" in str(err.value)
    monkeypatch.setenv("FEDGE_DATA", str(tmp_path))  # a directory without mnist.npz
    with pytest.raises(ValueError, match=r"mnist.npz' \(from FEDGE_DATA\) not found"):
        datasets.mnist()


# --- fetch and import, on a synthetic "MNIST" whose checksums the test pins ------------


@pytest.fixture
def tiny_spec(monkeypatch, tmp_path):
    """datasets.FILES["mnist"] pinned to a tiny synthetic file (the real one
    is 11 MB and not here): its bytes, and the spec that accepts them."""
    from dataclasses import replace

    src = tmp_path / "src"
    src.mkdir()
    _tiny_mnist(src)
    path = src / "mnist.npz"
    spec = replace(datasets.MNIST_FILE, sha256=datasets.file_sha256(path), size=path.stat().st_size,
                   arrays_digest=datasets.arrays_sha256(path, datasets.MNIST_FILE.arrays))
    monkeypatch.setitem(datasets.FILES, "mnist", spec)
    return path


@pytest.fixture
def http_dir(tmp_path):
    """A directory served over HTTP on 127.0.0.1 (a stand-in for keras' URL)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_check_file_knows_the_published_file_and_the_same_arrays_in_another_archive(tiny_spec, tmp_path):
    spec = datasets.FILES["mnist"]
    assert datasets.check_file(spec, tiny_spec).detail.startswith("keras' mnist.npz, sha256 ")
    with np.load(tiny_spec) as z:
        np.savez_compressed(tmp_path / "again.npz", **{k: z[k] for k in z.files})  # same arrays, other bytes
    again = datasets.check_file(spec, tmp_path / "again.npz")
    assert again.ok and "MNIST's arrays, in another .npz" in again.detail
    np.savez(tmp_path / "other.npz", x_train=np.zeros((1, 28, 28), np.uint8), y_train=np.zeros(1, np.uint8),
             x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    other = datasets.check_file(spec, tmp_path / "other.npz")
    assert other.state == "mismatch" and "nor are its arrays MNIST's" in other.detail
    (tmp_path / "text.npz").write_text("not a zip")
    assert "not an .npz archive" in datasets.check_file(spec, tmp_path / "text.npz").detail
    assert datasets.check_file(spec, tmp_path / "none.npz").state == "missing"


def test_the_pinned_mnist_checksums_are_keras_and_the_arrays_of_the_real_file():
    assert datasets.MNIST_FILE.sha256 == "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
    assert datasets.MNIST_FILE.url == "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    from tests.conftest import mnist_file

    real = mnist_file()  # skips without FEDGE_DATA
    assert datasets.check_file(datasets.MNIST_FILE, real).ok


def test_fetch_downloads_checks_and_renames_into_place(tiny_spec, http_dir, no_data):
    root, url = http_dir
    (root / "mnist.npz").write_bytes(tiny_spec.read_bytes())
    check, downloaded = datasets.fetch("mnist", url=f"{url}/mnist.npz")
    assert downloaded and check.ok and check.path == no_data / "mnist.npz"
    assert (no_data / "mnist.npz").read_bytes() == tiny_spec.read_bytes()
    assert sorted(p.name for p in no_data.iterdir()) == ["mnist.npz"]  # no temporary file left
    assert len(datasets.mnist()[0]) == 6
    # A good copy is there: nothing downloaded (the server is not even asked).
    assert datasets.fetch("mnist", url=f"{url}/gone.npz") == (check, False)


def test_fetch_refuses_what_is_not_the_data_and_leaves_nothing(tiny_spec, http_dir, no_data):
    root, url = http_dir
    (root / "mnist.npz").write_bytes(b"PK not really" * 100)
    with pytest.raises(datasets.DataError, match=r"is not keras' mnist\.npz") as err:
        datasets.fetch("mnist", url=f"{url}/mnist.npz")
    assert "nothing was written" in str(err.value)
    assert list(no_data.iterdir()) == []
    with pytest.raises(datasets.DataError, match="HTTP 404"):
        datasets.fetch("mnist", url=f"{url}/missing.npz")
    # Something else already there is kept unless --force.
    (no_data / "mnist.npz").write_bytes(b"mine")
    with pytest.raises(datasets.DataError, match="pass --force"):
        datasets.fetch("mnist", url=f"{url}/mnist.npz")
    (root / "mnist.npz").write_bytes(tiny_spec.read_bytes())
    assert datasets.fetch("mnist", url=f"{url}/mnist.npz", force=True)[1]
    assert (no_data / "mnist.npz").read_bytes() == tiny_spec.read_bytes()


def test_fetch_without_a_network_is_one_line(tiny_spec, no_data):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(datasets.DataError, match=r"cannot download mnist\.npz") as err:
        datasets.fetch("mnist", url=f"http://127.0.0.1:{port}/mnist.npz", timeout=5)
    assert "fedge data import mnist FILE" in str(err.value) and "\n" not in str(err.value)
    assert not no_data.exists() or list(no_data.iterdir()) == []


def test_import_checks_the_file_and_copies_it_into_place(tiny_spec, tmp_path, no_data):
    check, copied = datasets.import_file("mnist", tiny_spec)
    assert copied and check.ok and (no_data / "mnist.npz").read_bytes() == tiny_spec.read_bytes()
    assert datasets.import_file("mnist", tiny_spec)[1] is False  # the same data: nothing to do
    assert datasets.import_file("mnist", no_data / "mnist.npz")[1] is False  # the file itself
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(datasets.DataError, match=r"bad\.npz is not keras' mnist\.npz"):
        datasets.import_file("mnist", tmp_path / "bad.npz")
    with pytest.raises(datasets.DataError, match="is not a file"):
        datasets.import_file("mnist", tmp_path / "none.npz")
    with np.load(tiny_spec) as z:
        np.savez_compressed(tmp_path / "again.npz", **{k: z[k] for k in z.files})
    with pytest.raises(datasets.DataError, match="pass --force"):  # other bytes over a good file: only asked
        datasets.import_file("mnist", tmp_path / "again.npz")
    assert datasets.import_file("mnist", tmp_path / "again.npz", force=True)[1]


def test_a_data_directory_that_cannot_be_written_is_one_line(tiny_spec, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FEDGE_DATA", str(tmp_path / "file" / "data"))
    with pytest.raises(datasets.DataError, match=r"cannot write data into .*set FEDGE_DATA"):
        datasets.import_file("mnist", tiny_spec)


def test_mnist_file_without_its_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="lacks arrays"):
        datasets.mnist(path=str(tmp_path / "mnist.npz"))
