"""The agent as a device runs it: `fedge agent --config ...` in its own
process, a per-round training worker, no PyTorch in memory while idle."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import fedge_cmd

from .support import identity_toml, job_config, running_aggregator, wait_for, wait_online

pytestmark = pytest.mark.integration


def mapped_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_idle_agent_holds_no_pytorch_and_trains_in_a_per_round_worker(mosquitto, tmp_path, cli_env):
    state = tmp_path / "agent-state"
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[agent]\nid = "pi-1"\njob = "idle"\nstate_dir = "{state}"\n'
        f'[data]\nfactory = "fedge.datasets:digits"\nargs = {{ client = 0, clients = 2 }}\n'
        f'[worker]\nmode = "per_round"\nthreads = 1\n'
        f'[broker]\nurl = "{mosquitto.url}"\n' + identity_toml(tmp_path, "pi-1")
    )
    agent = subprocess.Popen(fedge_cmd("agent", "--config", str(conf)), env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_online(mosquitto.port, "idle", ["pi-1"])
        idle_rss = rss_mb(agent.pid)
        assert not mapped_torch(agent.pid)
        assert idle_rss < 120, f"idle agent uses {idle_rss:.0f} MB"
        cfg = job_config(tmp_path, mosquitto.url, job="idle", rounds=2, agents=1)
        with running_aggregator(cfg) as (service, records):
            assert service.done.wait(120), records
        assert [r["clients"] for r in records] == [1, 1]
        saved = json.loads((state / "agent.json").read_text())
        assert saved["last_round"] == 2 and saved["pending"]["acked_attempt"] == 1
        wait_for(lambda: not mapped_torch(agent.pid), 10, "the worker to exit")
        assert not mapped_torch(agent.pid), "training must not load PyTorch into the agent process"
        print(f"idle agent RSS: {idle_rss:.1f} MB")
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=20)
    assert agent.returncode == 0, err
    assert "Traceback" not in err
