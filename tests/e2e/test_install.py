"""deploy/install.sh as an operator runs it: a real (non-editable) install of
the package, which catches anything the wheel would leave out."""

import subprocess
from pathlib import Path

import pytest

from fedge.identity import Identity

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_inference_install_has_every_package_and_no_pytorch(tmp_path):
    prefix, etc = tmp_path / "opt", tmp_path / "etc"
    pinned = Identity.generate().public.to_text()
    proc = subprocess.run([str(REPO / "deploy" / "install.sh"), "inference", "--prefix", str(prefix),
                           "--etc", str(etc), "--no-service", "--aggregator-key", pinned],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fedge 0.1.0" in proc.stdout
    # Signed by default: the device's key pair was made, its public key printed to enroll, the aggregator's pinned.
    mine = Identity.load(etc / "device.key")  # refuses a key file others can read
    assert f"fedge enroll --config job.toml <its agent.id> {mine.public.to_text()}" in proc.stdout
    assert (etc / "aggregator.pub").read_text().strip() == pinned
    py = prefix / "venv" / "bin" / "python"
    # Run from outside the checkout so only the installed copy can be found.
    check = subprocess.run(
        [str(py), "-c", "import importlib.util as u, edge_agent.runtime, edge_agent.serve, aggregator.rounds, "
         "export.cli, fedge.onnxrt, fedge.codecs; print(u.find_spec('torch') is None, edge_agent.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert check.returncode == 0, check.stderr
    no_torch, where = check.stdout.split()
    assert no_torch == "True" and str(prefix) in where
    config = (etc / "agent.toml").read_text()
    assert 'role = "inference"' in config
    assert f'key_file = "{etc}/device.key"' in config and "/etc/fedge" not in config  # paths follow --etc
    again = subprocess.run([str(REPO / "deploy" / "install.sh"), "inference", "--prefix", str(prefix),
                            "--etc", str(etc), "--no-service"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (etc / "agent.toml").read_text() == config, "configs are never overwritten"
    assert Identity.load(etc / "device.key").public == mine.public, "a device keeps its key"
    bad = subprocess.run([str(REPO / "deploy" / "install.sh"), "inference", "--aggregator-key", "0xabc"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--aggregator-key must be" in bad.stderr


@pytest.mark.parametrize("machine", ["armv7l", "armv6l"])
def test_a_32_bit_arm_system_gets_one_line_and_nothing_installed(tmp_path, machine):
    # A 32-bit Raspberry Pi OS, as uname reports it there.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "uname").write_text(f"#!/bin/sh\necho {machine}\n")
    (shim / "uname").chmod(0o755)
    import os

    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}")
    proc = subprocess.run([str(REPO / "deploy" / "install.sh"), "agent", "--prefix", str(tmp_path / "opt"),
                           "--etc", str(tmp_path / "etc"), "--no-service"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "64-bit Raspberry Pi OS" in proc.stderr, proc.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "etc").exists(), "never a half-installed device"


def test_help_prints_the_options():
    proc = subprocess.run([str(REPO / "deploy" / "install.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--aggregator-key KEY" in proc.stdout and "torch==2.9.1" in proc.stdout


def _jetson_install(tmp_path, pythonpath: str | None):
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([str(REPO / "deploy" / "install.sh"), "agent", "--system-site-packages", "--python",
                           "/usr/bin/python3", "--prefix", str(tmp_path / "opt"), "--etc", str(tmp_path / "etc"),
                           "--no-service"], env=env, capture_output=True, text=True, timeout=120)


def test_jetson_path_without_a_system_pytorch_gets_one_line_and_nothing_installed(tmp_path):
    # --system-site-packages is the Jetson path: JetPack's PyTorch, never PyPI's.
    # This host's system Python has none.
    proc = _jetson_install(tmp_path, None)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "sees no PyTorch" in proc.stderr, proc.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "etc").exists(), "never a half-installed device"


def test_jetson_path_with_a_pytorch_older_than_the_worker_needs_is_refused(tmp_path):
    # JetPack 5's PyTorch, as its version string reads (the module is a stand-in).
    fake = tmp_path / "jetpack5"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text('__version__ = "2.1.0a0+41361538.nv23.06"\n')
    proc = _jetson_install(tmp_path, str(fake))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and f"PyTorch 2.1.0a0+41361538.nv23.06 ({fake / 'torch'}) is older than 2.3" in line, \
        line
    assert not (tmp_path / "opt").exists()


@pytest.mark.parametrize(("python", "says"), [
    ("python3", "needs a full path"),
    ("/nonexistent/python3", "is not an executable"),
    ("/usr/bin/python3", "cannot import PyTorch"),  # this host's system Python has none
    ("{other}", "is Python 3.99 and the virtualenv's"),
])
def test_worker_python_that_cannot_train_is_refused_before_anything_is_made(tmp_path, python, says):
    if python == "{other}":
        # An interpreter of another Python version than the virtualenv's. A
        # stand-in that only answers the one question install.sh asks it (its
        # version), so the check runs on any machine.
        python = str(tmp_path / "python3.99")
        Path(python).write_text("#!/bin/sh\necho 3.99\n")
        Path(python).chmod(0o755)
    proc = subprocess.run([str(REPO / "deploy" / "install.sh"), "agent", "--python", "/usr/bin/python3",
                           "--worker-python", python, "--prefix", str(tmp_path / "opt"), "--etc", str(tmp_path / "etc"),
                           "--no-service"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "etc").exists()
