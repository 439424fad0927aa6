"""Built-in data sets and the ways to split them across clients.

Every loader returns ``(x, y)`` NumPy arrays (float32 features, int64
labels) for one split and, when ``client`` is given, one client's share of
it. Shares are a pure function of (labels, clients, seed), so every agent of
a simulated fleet computes the same split without talking to the others.

- ``digits``: scikit-learn's 8x8 digits (1797 images, offline).
- ``breast_cancer``: scikit-learn's tabular set (569 rows, 30 features).
- ``mnist``: MNIST from a ``.npz`` with x_train/y_train/x_test/y_test
  (``path``, else ``mnist.npz`` in ``$FEDGE_DATA``, else in the user cache,
  ``$XDG_CACHE_HOME/fedge`` or ``~/.cache/fedge``; fedge ships no copy).

Files fedge does not ship are found, checked, fetched (``fetch``: keras'
public URL, verified, written atomically) and imported (``import_file``)
here; ``fedge data`` is their command line.

Partitions: ``iid`` (shuffled equal shares), ``dirichlet`` (label skew:
each class is spread over clients by Dirichlet(alpha) proportions, Hsu et
al. 2019) and ``shards`` (McMahan et al. 2017: sort by label, cut into
``clients * shards_per_client`` shards, deal each client that many).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedge.errors import OneReasonError
from fedge.files import fsync_dir

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


# --- files fedge does not ship: where they live, fetching and importing them ------------


class DataError(OneReasonError):
    """A data file that is missing, not what it claims, or cannot be fetched
    or put in place: one line naming the problem and the fix."""

    default_reason = "data"


@dataclass(frozen=True)
class DataFile:
    """A built-in data set that lives in a file fedge does not ship."""

    name: str
    filename: str
    title: str
    url: str
    # SHA-256 of the file as ``url`` publishes it.
    sha256: str
    size: int
    arrays: tuple[str, ...]
    # SHA-256 of the arrays themselves (``arrays_sha256``), so that the same
    # data in another .npz container (another zlib, another zip writer) is
    # recognised too.
    arrays_digest: str


MNIST_FILE = DataFile(
    name="mnist", filename="mnist.npz", title="keras' mnist.npz",
    url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
    # The hash keras itself checks the download against (keras.datasets.mnist.load_data:
    # get_file(..., file_hash="731c5ac6...")), for a file of 11,490,434 bytes.
    sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    size=11_490_434,
    arrays=("x_train", "y_train", "x_test", "y_test"),
    # Pinned from a conversion of MNIST that is not keras' file (its file hash
    # differs): the PNGs of the MIT-licensed rasbt/mnist-pngs repository, in
    # the canonical order, uint8 arrays of keras' names, shapes and dtypes;
    # its training pixels' mean is 0.1306604762738429, MNIST's well-known
    # figure. Not checked against keras' own file, which could not be
    # downloaded where this was written; keras' file is recognised by
    # ``sha256`` above whatever its arrays hash to.
    arrays_digest="e1ef5896629acb2fe08fb85a7a2e3fdf384add822d9b7c6bc876df48110a605e",
)
FILES: dict[str, DataFile] = {MNIST_FILE.name: MNIST_FILE}
# Built-in sets that come with scikit-learn (no file to fetch).
SKLEARN_SETS = ("digits", "breast_cancer")
DATA_ENV = "FEDGE_DATA"
_FETCH_HINT = f"run `fedge data fetch mnist` or set {DATA_ENV} to the directory that holds mnist.npz"


def data_dir() -> tuple[Path, str]:
    """The directory built-in data files are read from (and fetched into),
    and where that came from: ``$FEDGE_DATA`` when set, else the user's
    cache, ``$XDG_CACHE_HOME/fedge`` (an absolute XDG_CACHE_HOME only, as
    the XDG spec says) or ``~/.cache/fedge``."""
    data = os.environ.get(DATA_ENV, "")
    if data:
        return Path(data).expanduser(), DATA_ENV
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fedge", "XDG_CACHE_HOME"
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no password entry
        raise DataError(f"no home directory to keep data in (HOME is not set): set {DATA_ENV} to a data "
                        "directory") from None
    return home / ".cache" / "fedge", "the user cache"


def data_file(name: str) -> Path:
    """Where the built-in data set ``name`` is looked for."""
    return data_dir()[0] / spec(name).filename


def spec(name: str) -> DataFile:
    """The file behind a built-in data set; DataError naming the known ones."""
    key = name.replace("-", "_")
    if key in FILES:
        return FILES[key]
    if key in SKLEARN_SETS:
        raise DataError(f"{name} ships with scikit-learn and has no file to fetch or import (pip install "
                        "'fedge[demo]' brings scikit-learn)")
    raise DataError(f"no built-in data set is called {name!r}: the one kept in a file is "
                    f"{', '.join(sorted(FILES))}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(path: str | os.PathLike[str], names: Sequence[str]) -> str:
    """SHA-256 over the named arrays of an ``.npz``: for each in order, a line
    ``name dtype shape`` then its bytes in C order. Independent of how the
    archive was compressed. Raises ValueError (or OSError) for a file that is
    not an ``.npz`` holding those arrays."""
    digest = hashlib.sha256()
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("it is a single .npy array, not an .npz archive")
            missing = [n for n in names if n not in z.files]
            if missing:
                raise ValueError(f"it lacks arrays {', '.join(missing)}")
            for n in names:
                a = np.ascontiguousarray(z[n])
                digest.update(f"{n} {a.dtype.str} {'x'.join(map(str, a.shape))}\n".encode())
                digest.update(a.tobytes())
    except (zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ValueError(f"it is not a readable .npz ({exc})") from None
    except ValueError as exc:
        if str(exc).startswith("it "):
            raise
        raise ValueError(f"it is not a readable .npz ({exc})") from None
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """What ``check_file`` found at ``path``: state ``ok``, ``missing`` or
    ``mismatch``, and a phrase saying how it knows."""

    path: Path
    state: str
    detail: str
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check_file(f: DataFile, path: str | os.PathLike[str]) -> FileCheck:
    """Is ``path`` the data ``f`` names? Its file hash is the published one,
    or its arrays are the same (``arrays_digest``)."""
    p = Path(path)
    if not p.is_file():
        return FileCheck(p, "missing", "not there")
    try:
        got = file_sha256(p)
    except OSError as exc:
        return FileCheck(p, "mismatch", f"cannot be read ({exc.strerror or exc})")
    if got == f.sha256:
        return FileCheck(p, "ok", f"{f.title}, sha256 {got}", got)
    try:
        arrays = arrays_sha256(p, f.arrays)
    except (ValueError, OSError) as exc:
        return FileCheck(p, "mismatch", f"sha256 {got} is not {f.title}'s and {exc}", got)
    if arrays == f.arrays_digest:
        return FileCheck(p, "ok", f"{f.name.upper()}'s arrays, in another .npz than {f.title} (sha256 {got})", got)
    return FileCheck(p, "mismatch", f"sha256 {got} is not {f.title}'s ({f.sha256}), nor are its arrays "
                     f"{f.name.upper()}'s", got)


def _staging(dest: Path) -> Path:
    """A temporary name beside ``dest`` (same file system: the rename is atomic),
    after making its directory; DataError when it cannot be written."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise DataError(f"cannot write data into {str(dest.parent)!r}: {exc.strerror or exc}; set {DATA_ENV} to a "
                        "directory this user can write") from None
    return Path(tmp)


def _install(f: DataFile, tmp: Path, dest: Path, what: str) -> FileCheck:
    """Check the staged ``tmp`` and rename it over ``dest``, or remove it and
    raise DataError naming ``what`` it came from."""
    try:
        check = check_file(f, tmp)
        if not check.ok:
            raise DataError(f"{what} is not {f.title}: {check.detail}; nothing was written")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return replace(check, path=dest)


def _refuse_existing(f: DataFile, dest: Path, force: bool) -> FileCheck | None:
    """The check of a file already at ``dest`` that is good (nothing to do);
    None when there is none or ``force``; DataError when one is there and is
    not the data, without ``force``."""
    if force or not dest.exists():
        return None
    check = check_file(f, dest)
    if check.ok:
        return check
    raise DataError(f"{dest} is already there and {check.detail}; pass --force to replace it")


def fetch(name: str, url: str | None = None, force: bool = False, timeout: float = 30.0) -> tuple[FileCheck, bool]:
    """Download a built-in data set's file into ``data_dir()``, checked
    before it is renamed into place. Returns the check of the file and
    whether it was downloaded (False: a good copy was already there).
    A progress line is drawn on a terminal only."""
    import urllib.error
    import urllib.request

    from fedge.progress import Progress

    f = spec(name)
    dest = data_dir()[0] / f.filename
    present = _refuse_existing(f, dest, force)
    if present is not None:
        return present, False
    source = url or f.url
    tmp = _staging(dest)
    limit = 4 * f.size  # a misbehaving server cannot fill the disk
    try:
        request = urllib.request.Request(source, headers={"User-Agent": "fedge"})
        with (urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out,
              Progress(f"downloading {f.filename}", total=f.size >> 10, unit="KiB") as progress):
            got = 0
            for block in iter(lambda: response.read(1 << 16), b""):
                got += len(block)
                if got > limit:
                    raise DataError(f"{source} sent more than {limit} bytes, not {f.title}; nothing was written")
                out.write(block)
                progress.set(got >> 10)
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {f.filename} from {source}: HTTP {exc.code} {exc.reason}; try again later, "
                        f"or download it elsewhere and run `fedge data import {f.name} FILE`") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, DataError):
            raise
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        reason = getattr(reason, "strerror", None) or reason
        raise DataError(f"cannot download {f.filename} from {source} ({reason}): is this machine offline? Download it "
                        f"where there is a network and run `fedge data import {f.name} FILE`, or set {DATA_ENV} to "
                        "a directory that holds it") from None
    return _install(f, tmp, dest, f"what {source} sent"), True


def import_file(name: str, source: str | os.PathLike[str], force: bool = False) -> tuple[FileCheck, bool]:
    """Copy a file the user has into ``data_dir()`` after checking it.
    Returns the check and whether it was copied (False: the same data was
    already there)."""
    f = spec(name)
    src = Path(source).expanduser()
    if not src.is_file():
        raise DataError(f"{str(src)!r} is not a file: give the path of the {f.filename} you have, or run "
                        f"`fedge data fetch {f.name}`")
    theirs = check_file(f, src)
    if not theirs.ok:
        raise DataError(f"{src} is not {f.title}: {theirs.detail}; get it with `fedge data fetch {f.name}`")
    dest = data_dir()[0] / f.filename
    if dest.exists() and dest.resolve() == src.resolve():
        return replace(theirs, path=dest), False
    present = _refuse_existing(f, dest, force)
    if present is not None and present.sha256 == theirs.sha256:
        return present, False
    if present is not None:
        raise DataError(f"{dest} already holds {present.detail}; pass --force to replace it with {src}")
    tmp = _staging(dest)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as out:
            os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot copy {src} to {dest.parent}: {exc.strerror or exc}") from None
    return _install(f, tmp, dest, str(src)), True


# --- MNIST ----------------------------------------------------------------------

_MNIST_KEYS = MNIST_FILE.arrays


def _mnist_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The file ``mnist`` reads: ``path``, else ``mnist.npz`` in
    ``data_dir()`` ($FEDGE_DATA, else the user cache). DataError (a
    ValueError) saying how to get it when the file is not there."""
    if path is None or str(path) == "":
        directory, origin = data_dir()
        p = directory / MNIST_FILE.filename
        if not p.is_file():
            raise DataError(f"MNIST file {str(p)!r} (from {origin}) not found: {_FETCH_HINT}")
        return p
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"MNIST file {str(p)!r} (the path given) not found: correct the path, or leave it out and "
                        f"{_FETCH_HINT}")
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
    ``path``, or when it is not given (or empty) ``mnist.npz`` in
    ``$FEDGE_DATA``, else in the user cache (``$XDG_CACHE_HOME/fedge`` or
    ``~/.cache/fedge``), where ``fedge data fetch mnist`` puts it. fedge
    ships no copy; with no file there, this raises ValueError saying how to
    get one. The file's checksum is not checked here (``fedge data`` does)."""
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
