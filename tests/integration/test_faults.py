"""Faults a fleet meets: a device dying mid-round, the aggregator SIGKILLed at
random moments, duplicated and malformed messages on the update topic."""

import contextlib
import random
import signal
import subprocess
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge import chunks, tensors, wire
from fedge.codecs import make_codec
from fedge.config import updated
from fedge.messages import Update
from fedge.topics import JobTopics
from tests.conftest import fedge_cmd

from .support import (
    devices,
    identity_toml,
    job_config,
    read_log,
    running_aggregator,
    running_fleet,
    wait_for,
    wait_online,
)

pytestmark = pytest.mark.integration


def write_agent_config(path, url, agent_id, state_dir, data="fedge.datasets:digits", data_args=None):
    args = data_args or {"client": 0, "clients": 3}
    inline = ", ".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in args.items())
    path.write_text(
        f'[agent]\nid = "{agent_id}"\njob = "faults"\nstate_dir = "{state_dir}"\nresend_after_s = 3.0\n'
        f'[data]\nfactory = "{data}"\nargs = {{ {inline} }}\n'
        f'[worker]\nmode = "warm"\nthreads = 1\n'
        f'[broker]\nurl = "{url}"\nkeepalive_s = 2\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
        + identity_toml(path.parent, agent_id)
    )


def test_a_device_killed_mid_round_does_not_stall_the_job(mosquitto, tmp_path, cli_env):
    cfg = job_config(tmp_path, mosquitto.url, job="faults", rounds=3, agents=2)
    # Long enough that the kill (and the broker's last will) land well inside
    # round 1 even when cold workers are slow on a loaded machine.
    cfg = updated(cfg, selection={"deadline_s": 40.0})
    procs = []
    for i, data in enumerate(["fedge.datasets:digits", "fedge.datasets:digits", "tests.helpers:slow_digits"]):
        conf = tmp_path / f"agent{i}.toml"
        extra = {"delay": 60.0} if i == 2 else {}
        write_agent_config(conf, mosquitto.url, f"dev-{i}", tmp_path / f"state{i}", data,
                           {"client": i, "clients": 3, **extra})
        procs.append(subprocess.Popen(fedge_cmd("agent", "--config", str(conf)), env=cli_env,
                                      stderr=subprocess.PIPE, text=True))
    try:
        wait_online(mosquitto.port, "faults", ["dev-0", "dev-1", "dev-2"])
        with running_aggregator(cfg) as (service, records):
            # dev-2 is selected for round 1 and stuck in training: pull its plug.
            wait_for(lambda: service.core.open is not None and service.core.open.round == 1, 60, "round 1 to open")
            wait_for(lambda: service.core.open is not None and service.core.open.round == 1
                     and len(service.core.open.accepted) == 2, 60, "the two healthy updates")
            procs[2].send_signal(signal.SIGKILL)
            assert service.done.wait(90), f"job stalled: {records}"
        first = records[0]
        assert first["status"] == "ok" and first["clients"] == 2 and first["selected"] == 3
        # Its last will said it went away: the round closed on the others' updates after the short
        # grace (selection.offline_grace_s), not at the deadline.
        assert first["closed_by"] == "quorum" and first["seconds"] < 40.0
        # Its last will marked it offline: later rounds select only the living.
        assert all(r["selected"] == 2 and r["clients"] == 2 for r in records[1:])
        assert "dev-2" not in service.core.roster.online
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_aggregator_sigkilled_at_random_moments_loses_no_round_and_counts_no_update_twice(
        mosquitto, tmp_path, cli_env):
    rounds = 12
    conf = tmp_path / "job.toml"
    state = tmp_path / "aggregator"
    conf.write_text(
        f'[job]\nname = "crashy"\nrounds = {rounds}\nstate_dir = "{state}"\nlinger_s = 1\n'
        f'[selection]\nmin_clients = 4\ndeadline_s = 20\n'
        f'[training]\nepochs = 1\nbatch_size = 16\nlr = 0.1\n'
        f'[evaluate]\ndata = "fedge.datasets:digits"\nargs = {{ split = "test" }}\n'
        f'[broker]\nurl = "{mosquitto.url}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
    )
    rng = random.Random(7)
    fleet_specs = devices(tmp_path, "crashy", 4)
    from .support import broker_settings

    procs: list[subprocess.Popen] = []
    with running_fleet(fleet_specs, broker_settings(mosquitto.url)), _reaped(procs):
        kills = _kill_until_done(conf, state, rounds, rng, 0.4, procs, cli_env)
        # Started again after the last round, it republishes the final state and exits.
        again = subprocess.run(fedge_cmd("aggregator", "--config", str(conf)), env=cli_env, timeout=60,
                               capture_output=True, text=True)
        assert again.returncode == 0
    log = read_log(state)
    assert kills >= 3
    assert sorted(r["round"] for r in log) == list(range(1, rounds + 1)), "every round logged exactly once"
    for r in log:
        assert r["status"] == "ok"
        assert len(r["accepted"]) == len(set(r["accepted"])) == r["clients"] <= r["selected"]
    # Sample counts add up: no update folded twice into any round.
    sizes = {f"dev-{i}": len(spec.data_args) and _share(i) for i, spec in enumerate(fleet_specs)}
    for r in log:
        assert r["num_samples"] == sum(sizes[c] for c in r["accepted"])
    assert log[-1]["accuracy"] > 0.7
    assert any(r.get("attempt", 1) > 1 for r in log), "some round was re-announced after a crash"


def test_a_buffered_job_sigkilled_at_random_moments_loses_no_version_and_folds_each_task_once(
        mosquitto, tmp_path, cli_env):
    """The same for buffered asynchronous aggregation: every version logged
    once, each device's update for a task in at most one version, the
    devices whose updates a crash lost sending them again."""
    versions = 12
    conf = tmp_path / "job.toml"
    state = tmp_path / "aggregator"
    conf.write_text(
        f'[job]\nname = "crashy"\nrounds = {versions}\nstate_dir = "{state}"\nlinger_s = 1\n'
        f'[server]\nmode = "buffered"\n'
        f'[buffered]\nconcurrency = 3\nbuffer_size = 2\nmax_staleness = 4\n'
        f'[selection]\nmin_clients = 2\ndeadline_s = 20\n'
        f'[training]\nepochs = 1\nbatch_size = 16\nlr = 0.1\n'
        f'[evaluate]\ndata = "fedge.datasets:digits"\nargs = {{ split = "test" }}\n'
        f'[broker]\nurl = "{mosquitto.url}"\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
    )
    rng = random.Random(11)
    from .support import broker_settings

    procs: list[subprocess.Popen] = []
    with running_fleet(devices(tmp_path, "crashy", 4), broker_settings(mosquitto.url)), _reaped(procs):
        kills = _kill_until_done(conf, state, versions, rng, 0.3, procs, cli_env)
    log = read_log(state)
    assert kills >= 3
    assert sorted(r["round"] for r in log) == list(range(1, versions + 1)), "every version logged exactly once"
    folded = []
    for r in log:
        assert r["status"] == "ok" and r["clients"] == 2 and r["buffered"]["version"] == r["round"]
        assert sorted(r["buffered"]["tasks"]) == sorted(r["accepted"])
        folded += list(r["buffered"]["tasks"].items())
    assert len(folded) == len(set(folded)) == 2 * versions, "a device's update for a task folded twice"
    assert len({task for _, task in folded}) == len(folded)
    assert any(r["attempt"] > 1 for r in log), "some version was built again after a crash"
    assert log[-1]["accuracy"] > 0.5


def _kill_until_done(conf, state, rounds, rng, within_s, procs, cli_env, most=5):
    """Start the aggregator, let it log a round (or two), SIGKILL it up to
    ``within_s`` later, and again, ``most`` times or until ``rounds`` are
    logged; the last start runs the job to its end. Returns the kills."""
    kills = 0
    while True:
        proc = subprocess.Popen(fedge_cmd("aggregator", "--config", str(conf)), env=cli_env,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        done = len({r["round"] for r in read_log(state)})
        if done >= rounds or kills >= most:
            assert proc.wait(120) == 0
            return kills
        wait_for(lambda p=proc, n=done: p.poll() is not None or len(read_log(state)) > n, 120, "progress")
        time.sleep(rng.uniform(0.0, within_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1


@contextlib.contextmanager
def _reaped(procs):
    """Whatever happens in the test, no aggregator outlives it."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _share(i):
    from fedge.datasets import digits

    return len(digits(client=i, clients=4, partition="dirichlet", alpha=0.5)[0])


def test_injected_duplicates_and_garbage_are_dropped_and_counted(mosquitto, tmp_path):
    # Unsigned (identity.signing = "off"), so that the garbage reaches the
    # parsers: signed, it is refused before (test_forgery.py).
    cfg = updated(job_config(tmp_path, mosquitto.url, job="hostile", rounds=3, agents=2),
                  identity={"signing": "off"})
    topics = JobTopics("hostile")
    captured: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def on_message(client, userdata, msg):
        with lock:
            captured.setdefault(msg.topic, []).append(msg.payload)

    spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = on_message
    spy.connect("127.0.0.1", mosquitto.port)
    spy.subscribe(topics.update_filter, qos=1)
    spy.loop_start()
    attacker = paho.Client(CallbackAPIVersion.VERSION2, client_id="attacker")
    attacker.connect("127.0.0.1", mosquitto.port)
    attacker.loop_start()

    def inject(topic, payload):
        attacker.publish(topic, payload, qos=1).wait_for_publish(5)

    # Long enough for a loaded machine's first training (a cold worker): the
    # test reads round 1's real updates.
    cfg = updated(cfg, selection={"deadline_s": 60.0})
    with running_aggregator(cfg) as (service, records), running_fleet(devices(tmp_path, "hostile", 2, signed=False),
                                                                       cfg.broker):
        wait_for(lambda: len(records) >= 1, 180, "round 1")
        core = service.core
        legit = captured[topics.update("dev-0")]
        # Replays of a real update of round 1 (now closed) and garbage of every kind.
        for part in legit:
            inject(topics.update("dev-0"), part)
        inject(topics.update("dev-1"), b"not a chunk at all")
        inject(topics.update("dev-1"), chunks.split(b"\x00" * 100, 1000)[0])  # a chunk of junk
        inject(topics.update("dev-1"), chunks.split(wire.encode(wire.Kind.UPDATE, {"job": "hostile"}), 1000)[0])
        spec = core.spec
        nan = {k: np.full(s, np.nan, np.float32) for k, s in spec.entries}
        forged = Update(job="hostile", round=core.next_round, sender="dev-1", update_id="evil", num_samples=10**9,
                        codec=core.codec_params, base_model=core.model_digest,
                        body=make_codec(core.codec_params).encode(
                            {k: np.zeros(s, np.float32) for k, s in spec.entries}, np.random.default_rng(0)))
        inject(topics.update("dev-1"), chunks.split(forged.encode(), 100_000)[0])
        nan_update = Update(job="hostile", round=core.next_round, sender="dev-0", update_id="nan", num_samples=5,
                            codec={"name": "none"}, base_model=core.model_digest, body=tensors.pack(nan))
        inject(topics.update("dev-0"), chunks.split(nan_update.encode(), 100_000)[0])
        inject(topics.update("mallory"), chunks.split(forged.encode(), 100_000)[0])
        assert service.done.wait(300), f"job did not finish: {records}"
        counters = dict(core.counters)
    spy.loop_stop()
    attacker.loop_stop()
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    # A refused update counts as its device's answer once the round has enough: on this broker without
    # ACL (or signatures) the forged NaN update in dev-0's name may close a round before dev-0's own.
    assert all(r["clients"] >= 1 for r in records) and sum(r["clients"] for r in records) >= 5
    # The replayed round-1 update: round 1 counted dev-0, so it is a duplicate (not "late", which would
    # make the device take it back into its residual).
    assert counters.get("duplicate", 0) >= 1
    assert counters.get("chunk_malformed", 0) >= 1
    assert counters.get("malformed", 0) >= 1  # the envelope without fields
    assert counters.get("bad_samples", 0) + counters.get("wrong_codec", 0) + counters.get("duplicate", 0) >= 2
    assert counters.get("sender_mismatch", 0) >= 1  # dev-1's topic, "mallory" forged header
    assert counters.get("accepted") == sum(r["clients"] for r in records)
