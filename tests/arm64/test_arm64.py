"""The edge agent on arm64, as a Raspberry Pi owner installs and runs it:
Debian bookworm arm64 (Raspberry Pi OS's base) under qemu-user, the
repository copied in as a ``git clone`` would leave it, ``deploy/install.sh``
run inside for the trainer and for an inference-only device, then both run
inside against an aggregator and a Mosquitto on the host.

Not part of ``make test``: it builds a root file system and installs PyTorch
under emulation. ``make test-arm64`` runs it (root, debootstrap, qemu-user-
static; tens of minutes the first time). What it measured goes to
``FEDGE_ARM64_REPORT`` (default ``bench/results/arm64.json``): emulated
figures, not a board's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.config import updated
from tests.conftest import REPO, free_port, mnist_file, require_root

from ..integration.support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.arm64
ROOT = Path(os.environ.get("FEDGE_ARM64_ROOT", str(Path.home() / ".cache" / "fedge-arm64" / "root")))
REPORT = Path(os.environ.get("FEDGE_ARM64_REPORT", str(REPO / "bench" / "results" / "arm64.json")))
MEASURED: dict[str, Any] = {}
# What imports ONNX Runtime runs under the newer qemu rootfs.sh copies in
# (Debian bookworm's 7.2, the binfmt_misc handler, crashes in that import).
ORT = ("/usr/local/bin/qemu-aarch64-ort", "/opt/fedge-inference/venv/bin/python")


def chroot(*cmd: str, timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(["chroot", str(ROOT), *cmd], env=env, capture_output=True, text=True, timeout=timeout,
                          **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def popen_chroot(*cmd: str, log: Path) -> subprocess.Popen:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8"}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(["chroot", str(ROOT), *cmd], env=env, stdout=out, stderr=subprocess.STDOUT)


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def root():
    require_root("make test-arm64 (debootstrap, chroot, binfmt_misc)")
    started = time.monotonic()
    subprocess.run(["bash", str(REPO / "tests" / "arm64" / "rootfs.sh"), str(ROOT)], check=True, timeout=3600)
    MEASURED["rootfs_ready_seconds"] = round(time.monotonic() - started, 1)
    assert chroot("uname", "-m").stdout.strip() == "aarch64"
    yield ROOT
    subprocess.run(["bash", str(REPO / "tests" / "arm64" / "rootfs.sh"), str(ROOT), "--umount"], check=False)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    MEASURED["emulation"] = (f"qemu-user {_qemu_version()} on {_host_cpu()}: emulated arm64, not a board's speed")
    REPORT.write_text(json.dumps({"benchmark": "arm64 (emulated)", "measured": MEASURED}, indent=2) + "\n")


def _qemu_version() -> str:
    """Both emulators: the binfmt_misc handler and the one for ONNX Runtime."""
    handler = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").read_text().splitlines()[1].split()[-1]
    versions = []
    for qemu in (handler, str(ROOT / ORT[0].lstrip("/"))):
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
        versions.append(out.split("\n")[0].split("version")[-1].strip().split()[0])
    return f"{versions[0]} (the agent, its worker), {versions[1]} (ONNX Runtime)"


def _host_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


@pytest.fixture(scope="module")
def installed(root):
    """The repository as a clone leaves it (tracked files only), then
    install.sh for the trainer and the inference-only role, nothing by hand."""
    if os.environ.get("FEDGE_ARM64_REUSE") == "1" and (root / "opt" / "fedge-inference" / "venv").exists():
        # Debugging the tests themselves: keep the installs of the last run.
        keys = {role: chroot(f"/opt/{prefix}/venv/bin/fedge", "keys", "show", "--key", f"/etc/{prefix}/device.key"
                             ).stdout.split()[-1]
                for role, prefix in (("agent", "fedge"), ("inference", "fedge-inference"))}
        return {role: {"public_key": key} for role, key in keys.items()}
    src = root / "opt" / "src" / "fedge"
    subprocess.run(["rm", "-rf", str(root / "opt"), str(root / "etc" / "fedge"), str(root / "etc" / "fedge-inference")],
                   check=True)
    src.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    with open(root / "opt" / "src.tar", "wb") as tar:
        subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=REPO, input=files, check=True, stdout=tar)
    subprocess.run(["tar", "-xf", str(root / "opt" / "src.tar"), "-C", str(src)], check=True)
    (root / "opt" / "src.tar").unlink()
    subprocess.run(["rm", "-f", str(root / "etc" / "systemd" / "system" / "fedge-agent.service"),
                    str(root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "fedge-agent.service")],
                   check=True)
    out = {}
    # The trainer exactly as a Pi owner runs it, systemd unit included; the
    # inference device is another board (one fedge-agent.service per device).
    for role, prefix, etc, flags in (("agent", "/opt/fedge", "/etc/fedge", ()),
                                     ("inference", "/opt/fedge-inference", "/etc/fedge-inference", ("--no-service",))):
        started = time.monotonic()
        proc = chroot("/opt/src/fedge/deploy/install.sh", role, "--prefix", prefix, "--etc", etc, *flags,
                      timeout=5400)
        seconds = time.monotonic() - started
        venv = root / prefix.lstrip("/") / "venv"
        out[role] = {"install_seconds": round(seconds, 1), "venv_mb": _du_mb(venv), "log": proc.stdout[-2000:]}
        assert "fedge 0.1.0" in proc.stdout, proc.stdout
        key = next(line for line in proc.stdout.splitlines() if "fedge enroll" in line).split()[-1]
        out[role]["public_key"] = key
    pkgs = chroot("/opt/fedge/venv/bin/python", "-m", "pip", "list", "--format=json").stdout
    names = {p["name"].lower(): p["version"] for p in json.loads(pkgs)}
    assert names["torch"] == "2.9.1" and not any(n.startswith("nvidia") for n in names), \
        "a Raspberry Pi install must never pull CUDA"
    inf = json.loads(chroot("/opt/fedge-inference/venv/bin/python", "-m", "pip", "list", "--format=json").stdout)
    assert "torch" not in {p["name"].lower() for p in inf}, "the inference role never installs PyTorch"
    MEASURED["install"] = {r: {k: v for k, v in o.items() if k not in ("log", "public_key")} for r, o in out.items()}
    MEASURED["systemd_unit"] = _check_unit(root, out["agent"]["log"])
    MEASURED["install"]["agent"]["torch"] = names["torch"]
    return out


def _check_unit(root: Path, log: str) -> dict[str, Any]:
    """install.sh wrote and enabled fedge-agent.service with no systemd running
    (a chroot, as when an SD-card image is built), and arm64's systemd finds
    nothing wrong with it. It cannot boot here (qemu-user runs programs, not an
    init), so the sandbox is checked by what systemd says of the file."""
    unit = root / "etc" / "systemd" / "system" / "fedge-agent.service"
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "fedge-agent.service"
    assert unit.exists() and wants.is_symlink(), log
    assert "enabled and starts at boot (systemd is not running here)" in log, log
    verify = chroot("systemd-analyze", "verify", "/etc/systemd/system/fedge-agent.service", check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = chroot("systemd-analyze", "security", "--offline=true", "/etc/systemd/system/fedge-agent.service")
    line = security.stdout.strip().splitlines()[-1]
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= 4.0, security.stdout  # systemd's "OK" band; without the hardening it is 8.5
    return {"enabled": True, "verify": "clean", "exposure": exposure, "systemd": chroot(
        "systemctl", "--version").stdout.split("\n")[0]}


def _fresh_state(device: str) -> None:
    """A device that never ran: the root is reused between runs, and an agent
    that remembers having trained (round 1, this model) would sit the round out."""
    subprocess.run(["rm", "-rf", str(ROOT / "var" / "lib" / device)], check=True)


def _agent_toml(etc: str, device: str, url: str, aggregator_key: str, extra: str = "") -> str:
    return (f'[agent]\nid = "{device}"\njob = "arm"\nstate_dir = "/var/lib/{device}"\n{extra}'
            f'[broker]\nurl = "{url}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
            f'[identity]\nkey_file = "{etc}/device.key"\naggregator_key = "{aggregator_key}"\n')


def _mnist_job(tmp_path: Path, url: str, rounds: int, min_clients: int):
    """A job on the MNIST 2NN, evaluated on this host, and the devices' own
    data: a file on each device read by a data factory (MNIST's here; the
    agent install has no scikit-learn)."""
    mnist = mnist_file()
    data_dir = ROOT / "var" / "lib" / "fedge-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "mnist.npz").write_bytes(mnist.read_bytes())
    return updated(job_config(tmp_path, url, job="arm", rounds=rounds, agents=min_clients),
                   job={"name": "arm", "model": "fedge.models:mnist_2nn", "rounds": rounds,
                        "state_dir": str(tmp_path / "aggregator")},
                   evaluate={"data": "fedge.datasets:mnist", "args": {"path": str(mnist), "split": "test",
                                                                       "limit": 2000}},
                   selection={"min_clients": min_clients, "deadline_s": 1800.0})


def test_the_arm64_agent_trains_rounds_that_are_folded(installed, mosquitto, tmp_path):
    from aggregator.registry import Registry
    from fedge.identity import PublicKey

    shared = {"clients": 2, "partition": "iid", "limit": 2000}
    cfg = _mnist_job(tmp_path, mosquitto.url, rounds=3, min_clients=2)
    host = devices(tmp_path, "arm", 1, prefix="x86", data="fedge.datasets:mnist", path=str(mnist_file()),
                   **shared)
    aggregator_key = host[0].aggregator_key.to_text()
    registry = Registry(tmp_path / "aggregator")
    registry.reload()
    registry.enroll("pi-arm64", PublicKey.from_text(installed["agent"]["public_key"]))
    metrics_port = free_port()
    _fresh_state("pi-arm64")
    toml = _agent_toml("/etc/fedge", "pi-arm64", mosquitto.url, aggregator_key) + (
        '[data]\nfactory = "fedge.datasets:mnist"\n'
        'args = { path = "/var/lib/fedge-data/mnist.npz", client = 1, clients = 2, partition = "iid", '
        'limit = 2000 }\n'
        f"[metrics]\nenabled = true\nport = {metrics_port}\n")
    (ROOT / "etc" / "fedge" / "agent.toml").write_text(toml)
    agent = popen_chroot("/opt/fedge/venv/bin/fedge", "agent", "--config", "/etc/fedge/agent.toml",
                         log=tmp_path / "arm-agent.log")
    try:
        # Idle: connected, no round yet. No PyTorch in the agent, as on x86.
        wait_for(lambda: _scrape(metrics_port).get("fedge_agent_connected") == 1.0, 300, "the arm64 agent online")
        time.sleep(3)
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
        MEASURED["idle_agent"] = {"rss_mb": round(_rss_mb(agent.pid), 1), "pytorch_loaded": "libtorch" in maps,
                                  "note": "VmRSS of the qemu-user process running the agent (qemu's own memory "
                                          "included)"}
        assert "libtorch" not in maps
        with running_aggregator(cfg) as (service, records), running_fleet(host, cfg.broker):
            assert service.done.wait(3600), f"job did not finish: {records}\n{(tmp_path / 'arm-agent.log').read_text()}"
        assert all(r["status"] == "ok" and "pi-arm64" in r["accepted"] for r in records), records
        assert records[-1]["accuracy"] > records[0]["accuracy"] - 0.05
        metrics = _scrape(metrics_port)
        assert metrics["fedge_agent_rounds_trained_total"] == 3.0
        MEASURED["training_round"] = {
            "last_training_seconds": round(metrics["fedge_agent_last_training_seconds"], 2),
            "worker_max_rss_mb": round(metrics["fedge_agent_worker_max_rss_bytes"] / 2**20, 1),
            "round_seconds": [r["seconds"] for r in records],
            "workload": "MNIST 2NN (199,210 parameters), 1,000 examples, 2 epochs, batch 16, worker per_round",
        }
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()


SYSTEM_TORCH = "/usr/local/lib/python3.11/dist-packages"


def test_the_jetson_paths_train_with_the_system_pytorch_and_install_none(installed, mosquitto, tmp_path):
    """A Jetson keeps JetPack's PyTorch, which NVIDIA ships as a wheel for the
    system Python. Neither the board nor that wheel is here (NVIDIA's index is
    not a package registry this machine reaches, and CUDA cannot run under
    qemu), so the stand-in is PyPI's CPU torch 2.9.1 installed for the root's
    system Python the same way, with pip. Both documented paths must install
    no PyTorch of their own and train with that one:
    ``install.sh agent --system-site-packages``, and ``--worker-python
    /usr/bin/python3``, whose agent virtualenv has no PyTorch at all (so a
    round it trains can only have run in that interpreter)."""
    from aggregator.registry import Registry
    from fedge.identity import PublicKey

    if chroot("/usr/bin/python3", "-c", "import torch", check=False).returncode != 0:
        chroot("/opt/fedge/venv/bin/python", "-m", "pip", "install", "--quiet", "--target", SYSTEM_TORCH,
               "torch==2.9.1", timeout=3600)
    installs: dict[str, Any] = {}
    for name, flags in (("jetson-site", ["--system-site-packages"]),
                        ("jetson-worker", ["--worker-python", "/usr/bin/python3"])):
        subprocess.run(["rm", "-rf", str(ROOT / "opt" / name), str(ROOT / "etc" / name)], check=True)
        started = time.monotonic()
        proc = chroot("/opt/src/fedge/deploy/install.sh", "agent", *flags, "--prefix", f"/opt/{name}", "--etc",
                      f"/etc/{name}", "--no-service", timeout=3600)
        installs[name] = {"install_seconds": round(time.monotonic() - started, 1),
                          "venv_mb": _du_mb(ROOT / "opt" / name / "venv")}
        # PyPI's aarch64 2.9.1 calls itself 2.9.1+cpu; NVIDIA's read 2.5.0a0+872d972e41.nv24.08.
        assert (f"PyTorch: the system's, 2.9.1+cpu ({SYSTEM_TORCH}/torch); none from PyPI" in proc.stdout), proc.stdout
        own = json.loads(chroot(f"/opt/{name}/venv/bin/python", "-m", "pip", "list", "--local", "--format=json"
                                ).stdout)
        assert not {p["name"].lower() for p in own} & {"torch", "nvidia-cuda-runtime-cu12"}, own
        installs[name]["public_key"] = next(
            line for line in proc.stdout.splitlines() if "fedge enroll" in line).split()[-1]
    sees = chroot("/opt/jetson-site/venv/bin/python", "-c", "import torch; print(torch.__file__)").stdout
    assert sees.startswith(SYSTEM_TORCH), sees
    assert chroot("/opt/jetson-worker/venv/bin/python", "-c", "import torch", check=False).returncode != 0
    assert 'python = "/usr/bin/python3"' in (ROOT / "etc" / "jetson-worker" / "agent.toml").read_text()

    cfg = _mnist_job(tmp_path, mosquitto.url, rounds=2, min_clients=2)
    registry = Registry(tmp_path / "aggregator")
    registry.reload()
    aggregator_key = devices(tmp_path, "arm", 1, prefix="x86")[0].aggregator_key.to_text()
    agents = []
    try:
        for i, name in enumerate(installs):
            registry.enroll(name, PublicKey.from_text(installs[name]["public_key"]))
            _fresh_state(name)
            worker = '[worker]\npython = "/usr/bin/python3"\n' if name == "jetson-worker" else ""
            toml = _agent_toml(f"/etc/{name}", name, mosquitto.url, aggregator_key) + worker + (
                '[data]\nfactory = "fedge.datasets:mnist"\n'
                f'args = {{ path = "/var/lib/fedge-data/mnist.npz", client = {i}, clients = 2, partition = "iid", '
                'limit = 2000 }\n')
            (ROOT / "etc" / name / "agent.toml").write_text(toml)
            agents.append(popen_chroot(f"/opt/{name}/venv/bin/fedge", "agent", "--config", f"/etc/{name}/agent.toml",
                                       log=tmp_path / f"{name}.log"))
        with running_aggregator(cfg) as (service, records):
            assert service.done.wait(3600), (records, [(tmp_path / f"{n}.log").read_text()[-2000:] for n in installs])
        assert all(r["status"] == "ok" and set(installs) <= set(r["accepted"]) for r in records), records
    finally:
        for agent in agents:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
    MEASURED["jetson_paths"] = {
        "stand_in": f"PyPI's CPU torch 2.9.1 installed for the system Python in {SYSTEM_TORCH}",
        "install": {n: {k: v for k, v in o.items() if k != "public_key"} for n, o in installs.items()},
        "round_seconds": [r["seconds"] for r in records],
    }


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_the_arm64_inference_device_installs_and_serves_the_quantized_model(installed, mosquitto, tmp_path):
    from aggregator.registry import Registry
    from fedge import datasets
    from fedge.identity import PublicKey

    cfg = job_config(tmp_path, mosquitto.url, job="arm", rounds=2, agents=2)
    cfg = updated(cfg, onnx={"every": 2, "name": "digits", "inputs": ["x:1x64:float32"], "quantize": "static",
                             "target": "arm64"})
    host = devices(tmp_path, "arm", 2, prefix="x86")
    registry = Registry(tmp_path / "aggregator")
    registry.reload()
    registry.enroll("kiosk-arm64", PublicKey.from_text(installed["inference"]["public_key"]))
    port = free_port()
    _fresh_state("kiosk-arm64")
    toml = _agent_toml("/etc/fedge-inference", "kiosk-arm64", mosquitto.url, host[0].aggregator_key.to_text(),
                       extra='role = "inference"\n') + f'[inference]\nartifact = "digits"\nserve = "127.0.0.1:{port}"\n'
    (ROOT / "etc" / "fedge-inference" / "agent.toml").write_text(toml)
    kiosk = popen_chroot(*ORT, "/opt/fedge-inference/venv/bin/fedge", "agent", "--config",
                         "/etc/fedge-inference/agent.toml", log=tmp_path / "kiosk.log")
    try:
        wait_for(lambda: _health(port) is not None, 300, "the arm64 inference device's API")
        with running_aggregator(cfg) as (service, records), running_fleet(host, cfg.broker):
            assert service.done.wait(600), records
            wait_for(lambda: service.artifacts, 600, "the ONNX export")
            published = service.artifacts[-1]
        wait_for(lambda: (_health(port) or {}).get("ready"), 600, "the arm64 device to install the model")
        health = _health(port)
        assert health["sha256"] == published["sha256"] and health["round"] == 2
        x, y = datasets.digits(split="test")
        answer = _post(port, {"inputs": x.tolist()})
        accuracy = float(np.mean(np.asarray(answer["predictions"]) == y))
        # ONNX Runtime's ARM kernels compute what the aggregator's target-faithful report said.
        MEASURED["inference_device"] = {"accuracy_on_arm64": accuracy, "reported_for_arm64": published["accuracy"],
                                        "host_default_kernels": published.get("host_accuracy")}
        assert abs(accuracy - published["accuracy"]) <= 0.005, MEASURED["inference_device"]
        assert "libtorch" not in Path(f"/proc/{kiosk.pid}/maps").read_text()
    finally:
        kiosk.terminate()
        kiosk.wait(30)


def _health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _post(port: int, payload: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("model", ["digits_mlp", "mnist_cnn"])
def test_quantize_target_arm64_figures_hold_on_arm64(installed, tmp_path, model, cli_env):
    """``fedge quantize --target arm64`` on the host reports figures for arm64;
    the same file evaluated inside the arm64 root with ONNX Runtime's ARM
    kernels must agree within 0.5 point of accuracy."""
    from fedge import datasets
    from tests.conftest import fedge_cmd

    work = tmp_path / model
    work.mkdir()
    if model == "digits_mlp":
        x, y = datasets.digits(split="test")
        factory, data, spec = "fedge.models:digits_mlp", "fedge.datasets:digits", "x:1x64:float32"
        train_args, cal_args, eval_args = {}, {"split": "train"}, {"split": "test"}
    else:
        mnist = str(mnist_file())
        x, y = datasets.mnist(path=mnist, split="test", shape="image", limit=2000)
        factory, data, spec = "fedge.models:mnist_cnn", "fedge.datasets:mnist", "x:1x1x28x28:float32"
        train_args = {"path": mnist, "shape": "image", "limit": 10000}
        cal_args = {"path": mnist, "split": "train", "shape": "image", "limit": 512}
        eval_args = {"path": mnist, "split": "test", "shape": "image", "limit": 2000}
    trained = work / "weights.pt"
    subprocess.run([sys.executable, "-m", "tests.arm64.train", factory, data, str(trained), json.dumps(train_args)],
                   env=cli_env, check=True, timeout=1800, cwd=REPO)
    subprocess.run(fedge_cmd("export", "--model", factory, "--weights", str(trained), "--input", spec, "--out",
                             str(work / "float.onnx")), env=cli_env, check=True, capture_output=True, timeout=600)
    q = subprocess.run(fedge_cmd("quantize", "--model", str(work / "float.onnx"), "--out", str(work / "int8.onnx"),
                                 "--mode", "static", "--target", "arm64", "--calibration", data,
                                 "--calibration-args", json.dumps(cal_args), "--eval", data, "--eval-args",
                                 json.dumps(eval_args), "--no-latency", "--json", str(work / "report.json")),
                       env=cli_env, capture_output=True, text=True, timeout=1800)
    assert q.returncode == 0, q.stderr
    report = json.loads((work / "report.json").read_text())
    host_figure = report["candidate"]["accuracy"]
    inside = ROOT / "opt" / "quantize-check"
    inside.mkdir(parents=True, exist_ok=True)
    (inside / "int8.onnx").write_bytes((work / "int8.onnx").read_bytes())
    np.savez(inside / "test.npz", x=x)
    chroot(*ORT, "/opt/fedge-inference/venv/bin/fedge", "predict", "--model", "/opt/quantize-check/int8.onnx",
           "--input", "/opt/quantize-check/test.npz", "--output", "/opt/quantize-check/out.npz", "--force",
           timeout=1800)
    predictions = np.load(inside / "out.npz")["predictions"]
    arm = float(np.mean(predictions == y))
    MEASURED.setdefault("quantize_arm64", {})[model] = {
        "host_reported": host_figure, "on_arm64": arm, "examples": len(y),
        "host_default_kernels": (report.get("host_default_kernels") or {}).get("accuracy")}
    assert abs(arm - host_figure) <= 0.005, MEASURED["quantize_arm64"][model]


def test_the_agent_unit_runs_under_arm64_systemd(installed, mosquitto, tmp_path):
    """Raspberry Pi OS bookworm's systemd (252, arm64) boots the root under
    systemd-nspawn, its PID 1 running under qemu-user, and starts the
    fedge-agent.service that install.sh enabled, with the unit's sandbox: the
    agent runs as ``fedge`` with no capabilities and no new privileges, and
    trains rounds that are folded. The unit's seccomp filters
    (SystemCallArchitectures, RestrictAddressFamilies) are not applied under
    qemu-user: the agent carries only the filters nspawn puts on every
    process in the container (an arm64 filter could not judge the host's x86
    system calls anyway). ``make test-systemd`` shows them applied, natively,
    on x86."""
    from aggregator.registry import Registry
    from fedge.identity import PublicKey
    from tests.systemd.nspawn import Booted, seccomp_filters, status_of

    device = "pi-systemd"
    cfg = _mnist_job(tmp_path, mosquitto.url, rounds=2, min_clients=1)
    aggregator_key = devices(tmp_path, "arm", 1, prefix="x86")[0].aggregator_key.to_text()
    registry = Registry(tmp_path / "aggregator")
    registry.reload()
    registry.enroll(device, PublicKey.from_text(installed["agent"]["public_key"]))
    subprocess.run(["rm", "-rf", str(ROOT / "var" / "lib" / "fedge-agent")], check=True)
    # The installed config, edited as the owner would; the state directory is the unit's.
    (ROOT / "etc" / "fedge" / "agent.toml").write_text(
        _agent_toml("/etc/fedge", device, mosquitto.url, aggregator_key).replace(
            f'state_dir = "/var/lib/{device}"', 'state_dir = "/var/lib/fedge-agent"')
        + '[data]\nfactory = "fedge.datasets:mnist"\n'
          'args = { path = "/var/lib/fedge-data/mnist.npz", client = 0, clients = 2, partition = "iid", '
          'limit = 2000 }\n')
    script = str(REPO / "tests" / "arm64" / "rootfs.sh")
    subprocess.run(["bash", script, str(ROOT), "--umount"], check=True)  # nspawn mounts its own
    booted = None
    try:
        started = time.monotonic()
        booted = Booted(ROOT, tmp_path / "nspawn.log", boot_timeout=900)
        boot_seconds = time.monotonic() - started

        def journal() -> str:
            assert booted is not None
            return booted.run("journalctl", "-u", "fedge-agent", "--no-pager", "-o", "cat", check=False,
                              timeout=300).stdout[-4000:]

        wait_for(lambda: booted.run("systemctl", "is-active", "fedge-agent", check=False, timeout=300
                                    ).stdout.strip() == "active", 300, "fedge-agent.service active")
        active_seconds = time.monotonic() - started
        pid = int(booted.run("systemctl", "show", "-P", "MainPID", "fedge-agent", timeout=300).stdout)
        status = status_of(booted, pid)
        filters = seccomp_filters(booted, pid)
        with running_aggregator(cfg) as (service, records):
            finished = service.done.wait(3600)
            assert finished, f"job did not finish: {records}\n{journal()}"
        assert all(r["status"] == "ok" and device in r["accepted"] for r in records), (records, journal())
        assert status["CapBnd"] == "0000000000000000" and status["CapEff"] == "0000000000000000", status
        assert status["NoNewPrivs"] == "1", status
        assert status["Uid"].split()[0] == booted.run("id", "-u", "fedge").stdout.strip(), status
        restarts = booted.run("systemctl", "show", "-P", "NRestarts", "fedge-agent").stdout.strip()
        assert restarts == "0", journal()
        MEASURED.setdefault("systemd_unit", {}).update({
            "boot_seconds": round(boot_seconds, 1), "agent_active_seconds": round(active_seconds, 1),
            "ran_as": "fedge", "restarts": int(restarts),
            "process": {k: status[k] for k in ("CapBnd", "NoNewPrivs")},
            "seccomp_filters": {"agent": filters[0], "container_init": filters[1]},
            "round_seconds": [r["seconds"] for r in records],
            "note": "arm64 systemd as PID 1 under qemu-user in systemd-nspawn; " + (
                "the unit's seccomp filters are not applied under qemu-user (the agent has only nspawn's)"
                if filters[0] == filters[1] else "the unit's seccomp filters are applied")})
    finally:
        if booted is not None:
            booted.stop()
        subprocess.run(["bash", script, str(ROOT)], check=True, timeout=600, capture_output=True)
