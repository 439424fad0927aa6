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
