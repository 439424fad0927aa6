"""Built-in data sets and the ways to split them across clients.

Every loader returns ``(x, y)`` NumPy arrays (float32 features, int64
labels) for one split and, when ``client`` is given, one client's share of
it. Shares are a pure function of (labels, clients, seed), so every agent of
a simulated fleet computes the same split without talking to the others.

- ``digits``: scikit-learn's 8x8 digits (1797 images, offline).
- ``breast_cancer``: scikit-learn's tabular set (569 rows, 30 features).
- ``mnist``: MNIST from a ``.npz`` with x_train/y_train/x_test/y_test
  (``path``, else ``$FEDGE_DATA/mnist.npz``; fedge ships no copy).

Partitions: ``iid`` (shuffled equal shares), ``dirichlet`` (label skew:
each class is spread over clients by Dirichlet(alpha) proportions, Hsu et
al. 2019) and ``shards`` (McMahan et al. 2017: sort by label, cut into
``clients * shards_per_client`` shards, deal each client that many).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]


# --- partitions ------------------------------------------------------------------


def iid_partition(n: int, clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed shares; redrawn (deterministically) until every client
    holds at least ``min_size`` examples, as is customary."""
    if alpha <= 0:
        raise ValueError("dirichlet alpha must be positive")
    labels = np.asarray(labels)
    n = len(labels)
    min_size = min(min_size, n // clients)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shares[k].extend(part.tolist())
        if min(len(s) for s in shares) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
    raise ValueError(f"could not give every one of {clients} clients {min_size} examples with alpha={alpha}")


def shard_partition(labels: np.ndarray, clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, clients * shards_per_client)
    deal = np.random.default_rng(seed).permutation(len(shards))
    return [
        np.sort(np.concatenate([shards[s] for s in deal[k * shards_per_client : (k + 1) * shards_per_client]]))
        for k in range(clients)
    ]


def partition(labels: np.ndarray, clients: int, how: str, seed: int, alpha: float = 0.5,
              shards_per_client: int = 2) -> list[np.ndarray]:
    if how == "iid":
        return iid_partition(len(labels), clients, seed)
    if how == "dirichlet":
        return dirichlet_partition(labels, clients, alpha, seed)
    if how == "shards":
        return shard_partition(labels, clients, shards_per_client, seed)
    raise ValueError(f"unknown partition {how!r}; use iid, dirichlet or shards")


def _select(x: np.ndarray, y: np.ndarray, split: str, client: int | None, clients: int, how: str, seed: int,
            alpha: float, shards_per_client: int) -> Arrays:
    if client is None or split != "train":
        return x, y
    if not 0 <= client < clients:
        raise ValueError(f"client index {client} is outside 0..{clients - 1}")
    idx = _partition_cached(y.tobytes(), str(y.dtype), clients, how, seed, alpha, shards_per_client)[client]
    return x[idx], y[idx]


@functools.lru_cache(maxsize=32)
def _partition_cached(labels: bytes, dtype: str, clients: int, how: str, seed: int, alpha: float,
                      shards_per_client: int) -> list[np.ndarray]:
    return partition(np.frombuffer(labels, dtype=dtype), clients, how, seed, alpha, shards_per_client)


def _split_check(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")


# --- scikit-learn sets ---------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _sklearn_split(name: str, test_fraction: float, seed: int) -> tuple[Arrays, Arrays]:
    try:
        from sklearn import datasets as skd
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError(f"the built-in {name!r} data needs scikit-learn: pip install 'fedge[demo]'") from None
    loaded = skd.load_digits() if name == "digits" else skd.load_breast_cancer()
    x = loaded.data.astype(np.float32)
    y = loaded.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if name == "digits":
        x_tr, x_te = x_tr / 16.0, x_te / 16.0
    else:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-6
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return (x_tr.astype(np.float32), y_tr), (x_te.astype(np.float32), y_te)


def digits(split: str = "train", client: int | None = None, clients: int = 1, partition: str = "dirichlet",
           alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.25, shards_per_client: int = 2) -> Arrays:
    """scikit-learn digits, pixels scaled to [0, 1]; 64 features, 10 classes."""
    _split_check(split)
    train, test = _sklearn_split("digits", test_fraction, 0)
    x, y = train if split == "train" else test
    return _select(x, y, split, client, clients, partition, seed, alpha, shards_per_client)


def breast_cancer(split: str = "train", client: int | None = None, clients: int = 1, partition: str = "iid",
                  alpha: float = 0.5, seed: int = 0, test_fraction: float = 0.25,
                  shards_per_client: int = 2) -> Arrays:
    """scikit-learn breast cancer, standardised with training-split statistics;
    30 features, 2 classes."""
    _split_check(split)
    train, test = _sklearn_split("breast_cancer", test_fraction, 0)
    x, y = train if split == "train" else test
    return _select(x, y, split, client, clients, partition, seed, alpha, shards_per_client)


# --- MNIST ----------------------------------------------------------------------

_MNIST_ENV = "FEDGE_DATA"
_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
_MNIST_FIX = (f'pass path = "/path/to/mnist.npz" in the data args or set {_MNIST_ENV} to the directory that holds '
              f"mnist.npz (arrays {', '.join(_MNIST_KEYS)}, as in keras' mnist.npz)")


def _mnist_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The file ``mnist`` reads: ``path``, else ``$FEDGE_DATA/mnist.npz``.
    ValueError, naming both ways to give it, when neither is given or the
    file is not there."""
    if path is None or str(path) == "":
        data = os.environ.get(_MNIST_ENV, "")
        if not data:
            raise ValueError(f"MNIST needs its file, and neither path nor {_MNIST_ENV} is set: {_MNIST_FIX}")
        p, where = Path(data).expanduser() / "mnist.npz", f" (from {_MNIST_ENV})"
    else:
        p, where = Path(path).expanduser(), ""
    if not p.is_file():
        raise ValueError(f"MNIST file {str(p)!r}{where} not found: {_MNIST_FIX}")
    return p


@functools.lru_cache(maxsize=2)
def _mnist_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        missing = set(_MNIST_KEYS) - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}; an MNIST file has {', '.join(_MNIST_KEYS)}")
        return {k: z[k] for k in _MNIST_KEYS}


def mnist(path: str | None = None, split: str = "train", client: int | None = None,
          clients: int = 100, partition: str = "iid", shards_per_client: int = 2, alpha: float = 0.5,
          seed: int = 0, shape: str = "flat", limit: int = 0) -> Arrays:
    """MNIST scaled to [0, 1]; ``shape='flat'`` gives (n, 784) for the 2NN,
    ``'image'`` gives (n, 1, 28, 28) for the CNN. ``limit`` keeps the first
    rows of the split (after partitioning), for quick checks.

    The data come from a ``.npz`` with arrays x_train (60000x28x28 uint8),
    y_train, x_test (10000x28x28 uint8) and y_test, as keras' ``mnist.npz``:
    ``path``, or when it is not given (or empty) ``$FEDGE_DATA/mnist.npz``.
    fedge ships no copy; without either, or with no file there, this raises
    ValueError saying so."""
    _split_check(split)
    if shape not in ("flat", "image"):
        raise ValueError("shape must be 'flat' or 'image'")
    arrays = _mnist_arrays(str(_mnist_file(path)))
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"].astype(np.int64)
    if client is not None and split == "train":
        idx = _partition_cached(y.tobytes(), str(y.dtype), clients, partition, seed, alpha, shards_per_client)[client]
        x, y = x[idx], y[idx]
    if limit:
        x, y = x[:limit], y[:limit]
    x = x.astype(np.float32) / 255.0
    x = x.reshape(len(x), -1) if shape == "flat" else x.reshape(len(x), 1, 28, 28)
    return x, y
