"""A relayed job on real brokers: the root (``fedge aggregator``), its
relays (``fedge relay``) and their regions' devices, signed end to end.

* On Mosquitto, the root and the relays are SIGKILLed at random moments:
  every round is logged once, and each region's sum the root folded is
  exactly what its relay counted for that round, once.
* On a 3-node NATS JetStream cluster (its MQTT gateway on each node), the
  root, each relay and its devices on a node of their own; the node of a
  relay and its devices is killed mid-round: they move to another node
  (``broker.failover_urls``) and the job goes on, nothing lost or doubled.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedge_cli.identity import provision
from tests.conftest import fedge_cmd

from .support import broker_settings, devices, read_log, running_fleet, wait_for

JOB = "tree"


def _toml_list(urls: list[str]) -> str:
    return "[" + ", ".join(f'"{u}"' for u in urls) + "]"


class Tree:
    """A signed relayed job's files: the root's config and state, each
    relay's (its key enrolled with the root), each region's devices
    (enrolled with their relay, pinning its key and the root's)."""

    def __init__(self, tmp: Path, regions: dict[str, int], rounds: int, deadline_s: float = 20.0) -> None:
        self.tmp, self.regions, self.rounds = tmp, regions, rounds
        self.root_state = tmp / "root"
        root_key, relay_ids = provision(self.root_state, list(regions), tmp / "keys")
        self.root_key = root_key
        for name, identity in relay_ids.items():
            self.relay_state(name).mkdir(parents=True, exist_ok=True)
            identity.save(self.relay_state(name) / "aggregator.key")
        self.deadline_s = deadline_s

    def relay_state(self, region: str) -> Path:
        return self.tmp / f"relay-{region}"

    def config(self, name: str, urls: list[str]) -> Path:
        """The job's config (the root's; a relay runs with a copy whose broker is its node's)."""
        path = self.tmp / f"{name}.toml"
        path.write_text(
            f'[job]\nname = "{JOB}"\nrounds = {self.rounds}\nstate_dir = "{self.root_state}"\nlinger_s = 1\n'
            f'[selection]\nmin_clients = {min(self.regions.values())}\ndeadline_s = {self.deadline_s}\n'
            'settle_s = 0\noffline_grace_s = 2\n'
            '[training]\nepochs = 1\nbatch_size = 16\nlr = 0.1\n'
            '[evaluate]\ndata = "fedge.datasets:digits"\nargs = { split = "test" }\n'
            f'[relays]\nmin_relays = {len(self.regions)}\nmargin_s = 4\nroot_key = "{self.root_key.to_text()}"\n'
            f'[broker]\nurl = "{urls[0]}"\nfailover_urls = {_toml_list(urls[1:])}\nreconnect_min_s = 1\n'
            'reconnect_max_s = 2\nkeepalive_s = 5\n')
        return path

    def devices(self, urls_of: dict[str, list[str]]):
        specs = []
        total = sum(self.regions.values())
        first = 0
        for region, n in self.regions.items():
            ids = [f"{region}-{i}" for i in range(n)]
            relay_key, keys = provision(self.relay_state(region), ids, self.tmp / "keys")
            urls = urls_of[region]
            for spec in devices(self.tmp, JOB, n, prefix=region, signed=False):
                i = int(spec.client_id.rsplit("-", 1)[1])
                specs.append(spec.__class__(**{
                    **spec.__dict__, "region": region, "identity": keys[spec.client_id],
                    "aggregator_key": relay_key, "root_key": self.root_key,
                    "data_args": {**spec.data_args, "client": first + i, "clients": total},
                    "broker": broker_settings(urls[0], failover_urls=urls[1:])}))
            first += n
            assert [s.client_id for s in specs[-n:]] == ids
        return specs

    def root_cmd(self, conf: Path) -> list[str]:
        return fedge_cmd("aggregator", "--config", str(conf))

    def relay_cmd(self, conf: Path, region: str) -> list[str]:
        return fedge_cmd("relay", "--config", str(conf), "--region", region, "--state-dir",
                         str(self.relay_state(region)))

    def check_counted_once(self) -> list[dict]:
        """Every round logged once by the root, each ok; each region sum it
        folded is what that region's relay counted for that round."""
        log = read_log(self.root_state)
        assert sorted(r["round"] for r in log) == list(range(1, self.rounds + 1)), "every round logged once"
        relay_logs = {g: {r["round"]: r for r in read_log(self.relay_state(g))} for g in self.regions}
        for g in self.regions:
            rounds = [r["round"] for r in read_log(self.relay_state(g))]
            assert len(rounds) == len(set(rounds)), f"relay {g} logged a round twice"
        for r in log:
            assert r["status"] == "ok", r
            regions = r["relayed"]["regions"]
            assert sorted(r["accepted"]) == sorted(regions) and r["clients"] == len(regions)
            for g, folded in regions.items():
                counted = relay_logs[g].get(r["round"])
                assert counted is not None and counted["status"] == "ok", (g, r["round"])
                assert folded["devices"] == counted["clients"] == len(set(counted["accepted"]))
                assert folded["samples"] == counted["num_samples"], "a region's sum folded twice, or not its own"
            assert r["num_samples"] == sum(f["samples"] for f in regions.values())
        return log


@contextlib.contextmanager
def _reaped(procs: dict[str, subprocess.Popen]):
    try:
        yield
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_root_and_relays_sigkilled_at_random_moments_count_every_regions_sum_once(mosquitto, tmp_path, cli_env):
    regions = {"east": 3, "west": 3}
    # Enough rounds that the kills, each after a new round is logged, all land before the job's end.
    tree = Tree(tmp_path, regions, rounds=16)
    conf = tree.config("job", [mosquitto.url])
    cmds = {"root": tree.root_cmd(conf), **{g: tree.relay_cmd(conf, g) for g in regions}}
    procs: dict[str, subprocess.Popen] = {}
    rng = random.Random(5)
    victims = ["east", "root", "west"]  # each role once
    kills: list[str] = []
    with running_fleet(tree.devices({g: [mosquitto.url] for g in regions}), broker_settings(mosquitto.url)), \
            _reaped(procs):
        logs = {name: (tmp_path / f"{name}.log").open("ab") for name in cmds}
        for name, cmd in cmds.items():
            procs[name] = subprocess.Popen(cmd, env=cli_env, stderr=logs[name])
        while len(kills) < len(victims):
            done = len(read_log(tree.root_state))
            wait_for(lambda n=done: len(read_log(tree.root_state)) > n or procs["root"].poll() is not None, 120,
                     "the root's progress")
            if procs["root"].poll() is not None:
                break  # the job ended before the last kill
            time.sleep(rng.uniform(0.0, 0.3))  # within the round under way (rounds here take about 0.3 s)
            victim = victims[len(kills)]
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            kills.append(victim)
            procs[victim] = subprocess.Popen(cmds[victim], env=cli_env, stderr=logs[victim])
        assert procs["root"].wait(180) == 0
        for g in regions:
            assert procs[g].wait(60) == 0, f"relay {g} did not end with the job"
    assert kills == victims, kills
    log = tree.check_counted_once()
    assert log[-1]["accuracy"] > 0.6
    attempts = [r["attempt"] for g in regions for r in read_log(tree.relay_state(g))] + [r["attempt"] for r in log]
    assert max(attempts) > 1, "some round was re-opened after a crash"
    # `fedge status`: the root's view has its relays, a region's its devices (records signed by its relay).
    views = {}
    east = ["--region", "east", "--set", f"job.state_dir={tree.relay_state('east')}"]
    for region, extra in (("", []), ("east", east)):
        proc = subprocess.run(fedge_cmd("status", "--config", str(conf), "--json", "--wait", "3", *extra),
                              env=cli_env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        views[region] = json.loads(proc.stdout)
    assert sorted(views[""]["devices"]) == ["east", "west"]
    assert sorted(views["east"]["devices"]) == ["east-0", "east-1", "east-2"] and views["east"]["unverified"] == 0


@pytest.fixture
def nats_cluster(tmp_path):
    import shutil

    if shutil.which("nats-server") is None:
        pytest.fail("nats-server is not installed: apt-get install nats-server")
    from bench._common import NatsCluster

    # NATS's defaults: a session's consumers on three nodes, so that they outlive one node.
    cluster = NatsCluster(3, keep=tmp_path / "nats", mqtt="")
    yield cluster
    cluster.close()


def test_a_relayed_job_on_a_nats_cluster_goes_on_when_a_relays_node_is_killed_mid_round(nats_cluster, tmp_path,
                                                                                      cli_env):
    urls = nats_cluster.urls
    regions = {"east": 3, "west": 3}
    tree = Tree(tmp_path, regions, rounds=4)
    # The root on node 0, each relay and its devices on a node of their own; each knows the others as failover.
    nodes = {"root": 0, "east": 1, "west": 2}
    order = {name: [urls[n], *(u for i, u in enumerate(urls) if i != n)] for name, n in nodes.items()}
    confs = {name: tree.config(name, order[name]) for name in nodes}
    procs: dict[str, subprocess.Popen] = {}
    with running_fleet(tree.devices({g: order[g] for g in regions}), broker_settings(urls[0])), _reaped(procs):
        procs["root"] = subprocess.Popen(tree.root_cmd(confs["root"]), env=cli_env, stderr=subprocess.DEVNULL)
        for g in regions:
            procs[g] = subprocess.Popen(tree.relay_cmd(confs[g], g), env=cli_env, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(read_log(tree.root_state)) >= 1 or procs["root"].poll() is not None, 120,
                 "round 1 on the cluster")
        time.sleep(0.5)  # round 2 under way
        nats_cluster.kill(nodes["east"])
        assert procs["root"].wait(240) == 0
        for g in regions:
            assert procs[g].wait(60) == 0, f"relay {g} did not end with the job"
    log = tree.check_counted_once()
    short = [r["round"] for r in log if len(r["relayed"]["regions"]) < 2]
    assert len(short) <= 1 and log[-1]["round"] not in short, f"a region missing from rounds {short}"
    assert sum(r["relayed"]["devices"] for r in log) >= 4 * 6 - 6, "more than one round's worth of updates lost"

