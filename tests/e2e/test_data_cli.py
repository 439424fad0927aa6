"""`fedge data` as a user runs it: where each built-in data set is looked
for, fetching MNIST (from a local HTTP server standing in for keras' URL:
this machine may have no network) and importing a copy the user has."""

import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from fedge.datasets import MNIST_FILE
from tests.conftest import fedge_cmd, mnist_file

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(cli_env, tmp_path):
    """No FEDGE_DATA: data go to the test's own user cache."""
    e = {k: v for k, v in cli_env.items() if k != "FEDGE_DATA"}
    e["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return e


def run(env, *args, timeout=120):
    return subprocess.run(fedge_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("fedge data: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_data_lists_where_each_set_is_looked_for(env, tmp_path):
    cache = tmp_path / "cache" / "fedge"
    for argv in (["data"], ["data", "list"]):
        proc = run(env, *argv)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == f"data directory: {cache}, from XDG_CACHE_HOME (set FEDGE_DATA to use another directory)"
        mnist = next(line for line in lines if line.startswith("mnist "))
        assert "missing" in mnist and str(cache / "mnist.npz") in mnist and "fedge data fetch mnist" in mnist
        assert any(line.startswith("digits ") for line in lines)
    listed = json.loads(run(env, "data", "list", "--json").stdout)
    assert listed == json.loads(run(env, "data", "--json").stdout)
    assert listed["from"] == "XDG_CACHE_HOME"
    assert {d["name"]: d["state"] for d in listed["datasets"]}["mnist"] == "missing"
    there = run({**env, "FEDGE_DATA": str(tmp_path / "elsewhere")}, "data", "--json")
    assert json.loads(there.stdout)["datasets"][0]["path"] == str(tmp_path / "elsewhere" / "mnist.npz")


def test_fetch_without_a_network_is_one_line_and_exit_2(env, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: as good as no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run(env, "data", "fetch", "mnist", "--url", f"http://127.0.0.1:{port}/mnist.npz")
    one_line_error(proc, "cannot download mnist.npz", "offline", "fedge data import mnist FILE")
    cache = tmp_path / "cache" / "fedge"
    assert not cache.exists() or list(cache.iterdir()) == []  # no partial file left


@pytest.mark.parametrize(("argv", "words"), [
    (["fetch", "cifar"], "no built-in data set is called 'cifar'"),
    (["fetch", "digits"], "ships with scikit-learn"),
    (["import", "mnist", "/nonexistent/mnist.npz"], "is not a file"),
    (["fetch", "mnist", "--timeout", "0"], "--timeout 0 must be"),
])
def test_mistakes_are_one_line_and_exit_2(env, argv, words):
    one_line_error(run(env, "data", *argv), words)


def test_fetch_refuses_a_download_that_is_not_mnist(env, served, tmp_path):
    root, url = served
    (root / "mnist.npz").write_bytes(b"<html>a captive portal</html>")
    one_line_error(run(env, "data", "fetch", "mnist", "--url", f"{url}/mnist.npz"),
                   "is not keras' mnist.npz", "nothing was written")
    assert list((tmp_path / "cache" / "fedge").iterdir()) == []


def test_fetch_and_import_the_real_file(env, served, tmp_path):
    real = mnist_file()  # skips without FEDGE_DATA
    root, url = served
    shutil.copy(real, root / "mnist.npz")
    cache = tmp_path / "cache" / "fedge"
    proc = run(env, "data", "fetch", "mnist", "--url", f"{url}/mnist.npz")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{cache / 'mnist.npz'}: downloaded, ") and proc.stderr == ""
    assert hashlib.sha256((cache / "mnist.npz").read_bytes()).hexdigest() == \
        hashlib.sha256(real.read_bytes()).hexdigest()
    assert sorted(os.listdir(cache)) == ["mnist.npz"]
    listed = {d["name"]: d for d in json.loads(run(env, "data", "--json").stdout)["datasets"]}
    assert listed["mnist"]["state"] == "ok"
    # The loader finds it in the cache, with no FEDGE_DATA.
    script = "from fedge.datasets import mnist; print(mnist(split='test')[0].shape)"
    load = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert load.stdout.strip() == "(10000, 784)", load.stderr
    again = run(env, "data", "fetch", "mnist")  # already there: keras' URL is not even asked
    assert again.returncode == 0 and "already there" in again.stdout
    # Import into another directory (FEDGE_DATA), checked the same way.
    other = {**env, "FEDGE_DATA": str(tmp_path / "data")}
    imported = run(other, "data", "import", "mnist", str(real))
    assert imported.returncode == 0 and "copied from" in imported.stdout, imported.stderr
    assert (tmp_path / "data" / "mnist.npz").read_bytes() == real.read_bytes()
    (tmp_path / "junk.npz").write_bytes(b"junk")
    one_line_error(run(other, "data", "import", "mnist", str(tmp_path / "junk.npz")), "is not keras' mnist.npz")


def test_the_pinned_checksum_is_keras_own():
    # keras.datasets.mnist.load_data checks its download against this SHA-256.
    assert MNIST_FILE.sha256 == "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
