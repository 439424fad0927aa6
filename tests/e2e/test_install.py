"""deploy/install.sh as an operator runs it: a real (non-editable) install of
the package, which catches anything the wheel would leave out."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_inference_install_has_every_package_and_no_pytorch(tmp_path):
    prefix, etc = tmp_path / "opt", tmp_path / "etc"
    proc = subprocess.run([str(REPO / "deploy" / "install.sh"), "inference", "--prefix", str(prefix),
                           "--etc", str(etc), "--no-service"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fedge 0.1.0" in proc.stdout
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
    again = subprocess.run([str(REPO / "deploy" / "install.sh"), "inference", "--prefix", str(prefix),
                            "--etc", str(etc), "--no-service"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (etc / "agent.toml").read_text() == config, "configs are never overwritten"
