"""``fedge simulate`` against a real Mosquitto and a real aggregator: a few
hundred devices, each with its own connection, key and state, on a profile
with unequal devices, shaped links, churn, crashes and lost uploads; two
rounds. The large runs are bench/fleet.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fedge.config import updated
from fedge_cli.identity import provision

from .support import broker_settings, job_config, read_log, running_aggregator, wait_for

pytestmark = pytest.mark.integration

DEVICES = 240
PROFILE = """
name = "test-mixed"

[[group]]
name = "fast"
share = 0.5

[[group]]
name = "slow"
share = 0.5
[group.compute]
speed = { dist = "uniform", low = 2, high = 6 }
[group.network]
uplink_kbit_s = { dist = "uniform", low = 500, high = 2000 }
downlink_kbit_s = { dist = "uniform", low = 2000, high = 8000 }
latency_ms = { dist = "uniform", low = 20, high = 80 }
[group.availability]
online_s = { dist = "exponential", mean = 30, min = 5 }
offline_s = { dist = "exponential", mean = 3 }
[group.failures]
crash_in_training = 0.1
drop_in_upload = 0.1
restart_s = 1
"""


def test_a_simulated_fleet_on_a_real_broker_runs_two_rounds_and_counts_what_it_did(tmp_path, mosquitto, cli_env):
    job = "simjob"
    agg_key, _ = provision(tmp_path / "aggregator", [], tmp_path / "keys")
    (tmp_path / "profile.toml").write_text(PROFILE)
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'[agent]\nid = "sim"\njob = "{job}"\nstate_dir = "{tmp_path / "devices"}"\nresend_after_s = 5.0\n'
        f'[data]\nfactory = "fedge.datasets:digits"\nargs = {{ partition = "iid" }}\n'
        f'[identity]\naggregator_key = "{agg_key.to_text()}"\n'
        f'[worker]\nthreads = 1\n'
        f'[broker]\nurl = "{mosquitto.url}"\nreconnect_min_s = 0.5\nreconnect_max_s = 2.0\nkeepalive_s = 10\n')
    argv = [sys.executable, "-m", "fedge_cli", "simulate", "--config", str(agent), "--devices", str(DEVICES),
            "--profile", str(tmp_path / "profile.toml"), "--processes", "2", "--seed", "3"]
    # The operator's way: keys made in bulk, enrolled from the file they are listed in.
    subprocess.run([*argv, "--make-keys"], env=cli_env, check=True, timeout=120)
    keys = tmp_path / "devices" / "fleet-keys.txt"
    assert len(keys.read_text().splitlines()) == DEVICES
    subprocess.run([sys.executable, "-m", "fedge_cli", "enroll", "--config", str(_job_toml(tmp_path, mosquitto)),
                    "--from", str(keys)], env=cli_env, check=True, timeout=120, stdout=subprocess.DEVNULL)
    cfg = updated(job_config(tmp_path, mosquitto.url, job=job, rounds=2, agents=DEVICES // 2),
                  selection={"min_clients": DEVICES // 2, "quorum": 0.9, "deadline_s": 60.0, "settle_s": 3.0,
                             "offline_grace_s": 2.0},
                  training={"epochs": 1, "batch_size": 8, "lr": 0.1},
                  broker=broker_settings(mosquitto.url))
    summary = tmp_path / "summary.json"
    with running_aggregator(cfg) as (service, records):
        sim = subprocess.Popen([*argv, "--summary", str(summary)], env=cli_env, start_new_session=True)
        try:
            wait_for(lambda: service.done.is_set() or sim.poll() is not None, 300, "the job to end")
        finally:
            if sim.poll() is None:
                os.killpg(sim.pid, signal.SIGTERM)
            code = sim.wait(120)
    assert code == 0
    assert [r.status for r in records] == ["ok", "ok"], records
    for r in records:
        # every selected device is folded or counted with its reason
        answered = r.clients + r.declined + r.late + sum(r.rejected.values())
        assert r.clients >= r.selected // 2 and answered <= r.selected, r
        assert r.selected >= DEVICES // 2
    logged = read_log(tmp_path / "aggregator")
    assert [rec["round"] for rec in logged] == [1, 2]
    s = json.loads(summary.read_text())
    assert s["processes"] == 2 and s["processes_without_summary"] == 0 and s["devices"] == DEVICES
    assert s["internal_errors"] == 0, s
    assert s["groups"] == {"fast": DEVICES // 2, "slow": DEVICES // 2}
    counts = s["counts"]
    # The profile's churn and failures happened, and were counted, not raised.
    assert counts["crashed_in_training"] >= 1 and counts["connection_lost_in_upload"] >= 1, counts
    assert counts["went_offline"] >= 1 and counts["came_online"] >= 1, counts
    assert counts["trained"] >= sum(r.clients for r in records), counts
    # One copy of each model for all the devices of a process.
    assert s["model_memo"]["misses"] <= 2 * 8 and s["model_memo"]["hits"] >= DEVICES // 2, s["model_memo"]


def _job_toml(tmp_path, mosquitto):
    path = tmp_path / "job.toml"
    path.write_text(f'[job]\nname = "simjob"\nstate_dir = "{tmp_path / "aggregator"}"\n'
                    f'[broker]\nurl = "{mosquitto.url}"\n')
    return path
