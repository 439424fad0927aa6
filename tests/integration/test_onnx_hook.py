"""The export hook in a federation: the aggregator publishes each new global
model as a quantized ONNX file, and an inference-only device installs it,
verifies it and serves predictions without ever loading PyTorch."""

import hashlib
import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedge import datasets
from fedge.config import updated
from tests.conftest import fedge_cmd, free_port

from .support import devices, identity_toml, job_config, running_aggregator, running_fleet, wait_for, wait_online

pytestmark = pytest.mark.integration


def http(url, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def inference_config(path: Path, url: str, state: Path, port: int) -> None:
    path.write_text(
        f'[agent]\nid = "kiosk-1"\nrole = "inference"\njob = "onnx"\nstate_dir = "{state}"\n'
        f'[inference]\nartifact = "digits"\nserve = "127.0.0.1:{port}"\nthreads = 1\n'
        f'[broker]\nurl = "{url}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n' + identity_toml(path.parent, "kiosk-1")
    )


def test_new_global_models_reach_an_inference_only_device_as_verified_onnx(mosquitto, tmp_path, cli_env):
    state = tmp_path / "kiosk"
    port = free_port()
    conf = tmp_path / "kiosk.toml"
    inference_config(conf, mosquitto.url, state, port)
    kiosk = subprocess.Popen(fedge_cmd("agent", "--config", str(conf)), env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_online(mosquitto.port, "onnx", ["kiosk-1"])
        assert http(f"http://127.0.0.1:{port}/health")["ready"] is False
        cfg = job_config(tmp_path, mosquitto.url, job="onnx", rounds=2, agents=2)
        cfg = updated(cfg, onnx={"every": 2, "name": "digits", "inputs": ["x:1x64:float32"], "quantize": "static",
                                 "target": "arm64"})
        with running_aggregator(cfg) as (service, records), running_fleet(devices(tmp_path, "onnx", 2), cfg.broker):
            assert service.done.wait(120), records
            wait_for(lambda: service.artifacts, 240, "the ONNX export")
            published = service.artifacts[-1]
        assert [r["selected"] for r in records] == [2, 2], "the inference device is never selected to train"
        model_file = state / "digits.onnx"
        wait_for(lambda: model_file.exists() and (state / "digits.info.json").exists(), 60, "the download")
        body = model_file.read_bytes()
        assert hashlib.sha256(body).hexdigest() == published["sha256"]
        manifest = json.loads((state / "digits.manifest.json").read_text())
        assert manifest["sha256"] == published["sha256"] and published["variant"] == "int8"
        assert published["bytes"] < published["float_bytes"]

        health = http(f"http://127.0.0.1:{port}/health")
        assert health["ready"] and health["round"] == 2 and health["sha256"] == published["sha256"]
        x, y = datasets.digits(split="test")
        answer = http(f"http://127.0.0.1:{port}/predict", {"inputs": x.tolist()})
        accuracy = float(np.mean(np.asarray(answer["predictions"]) == y))
        # The device computes exactly what the aggregator's quantization report
        # measured: for the target (arm64), or, where this x86 host's default
        # int8 kernels compute something else (no VNNI), for them.
        assert abs(accuracy - published.get("host_accuracy", published["accuracy"])) < 1e-9
        assert abs(published["accuracy"] - published["float_accuracy"]) < 0.02
        assert "libtorch" not in Path(f"/proc/{kiosk.pid}/maps").read_text()

        np.savez(tmp_path / "test.npz", x=x, labels=y)
        cli = subprocess.run(fedge_cmd("predict", "--model", str(model_file), "--input", str(tmp_path / "test.npz")),
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert f"{accuracy * 100:.2f}%" in cli.stdout
    finally:
        kiosk.terminate()
        kiosk.wait(20)

    # Restarted with no broker reachable, it serves the installed model from disk.
    inference_config(conf, f"mqtt://127.0.0.1:{free_port()}", state, port)
    again = subprocess.Popen(fedge_cmd("agent", "--config", str(conf)), env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready():
            try:
                return http(f"http://127.0.0.1:{port}/health")["ready"]
            except OSError:
                return False

        wait_for(ready, 30, "the restarted device to serve")
        assert http(f"http://127.0.0.1:{port}/health")["round"] == 2
    finally:
        again.terminate()
        again.wait(20)
