"""A simulated fleet against a real aggregator and a real broker: scale and
time to accuracy under a fleet profile.

Everything runs as the operator would run it, as separate processes: a
private Mosquitto, ``fedge aggregator --config job.toml``, the devices'
keys made and enrolled in bulk (``fedge simulate --make-keys``, ``fedge
enroll --from``), then ``fedge simulate`` (N devices, each with its own
MQTT connection, key, data shard and state, over ``--processes``
processes). The job is MNIST 2NN, IID.

Two uses:

    # scale: every device in every round
    python bench/fleet.py --devices 10000 --rounds 5 --preset lab --out bench/results/fleet_10k.json
    # time to accuracy under a profile (100 devices of 600 examples, 10 a round, as in the FedAvg paper)
    python bench/fleet.py --devices 100 --fraction 0.1 --rounds 80 --target 0.97 --preset cellular-mixed \\
        --time-scale 10 --codec default --out bench/results/fleet_tta_cellular.json

The JSON has, per round, the devices selected, folded and refused (by
reason), the accuracy, and the aggregator process's CPU seconds (read from
/proc when the round's record appears, and by stage as the aggregator
itself counts them in the record); for the run, the aggregator's CPU
per folded update, the peak RSS of the aggregator and of the broker, the
bytes per device, the devices that never contributed, the wall clock to
the target accuracy (fleet time = wall x time scale) and what the
simulator counted (crashes, connections lost, sessions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import MQTT_FLEET_SETTINGS, REPO, NatsCluster, PrivateMosquitto, emit, machine, note
from fedge_cli.simulate import merge

CODECS = {"default": {"name": "int2", "params": {"lossless": "zlib"}}, "float32": {"name": "none", "params": {}}}
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` (by thread id and name)."""
    out = {}
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        out[f"{task.name} {name}"] = round((int(fields[11]) + int(fields[12])) / CLK, 2)
    return {k: v for k, v in out.items() if v > 0}


class ReceiptWatch:
    """The aggregator's receipts, as a device sees them (``ack/+``, QoS 0):
    per round, the aggregator's CPU seconds at its first receipt and at its
    latest. Between them the aggregator does what each update costs
    (decode, checks, fold, its signed receipt, the device records it
    publishes meanwhile) and nothing of the round's opening (the
    announcement, the invitations) or its close (the model step, the
    checkpoint, the evaluation)."""

    def __init__(self, url: str, job: str, pid: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from fedge.topics import JobTopics

        self.pid = pid
        self.rounds: dict[int, dict[str, float]] = {}
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-receipts-{os.getpid()}")
        self.client.on_message = self._message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(JobTopics(job).ack("+"), qos=0)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        from fedge import wire
        from fedge.wire import Kind

        peeked = wire.peek(msg.payload)
        if peeked is None or peeked[0] != Kind.ACK or not isinstance(peeked[1].get("round"), int):
            return
        cpu = cpu_seconds(self.pid)
        if cpu is None:
            return
        r = self.rounds.setdefault(peeked[1]["round"], {"first_cpu": cpu, "receipts": 0})
        r["last_cpu"] = cpu
        r["receipts"] += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def toml(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items()) + "\n"
                   for name, body in sections.items())


def fedge(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedge_cli", *args]


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fedge_cli.identity import provision

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    if args.broker == "nats3":
        streams = f"  stream_replicas: {args.nats_stream_replicas}\n" if args.nats_stream_replicas else ""
        nats = NatsCluster(3, keep=tmp / "nats" if args.keep else None, mqtt=MQTT_FLEET_SETTINGS + streams)
        # the aggregator on the first node; the devices, half and half, on the other two
        agg_url, device_urls, broker_pids, close_broker = nats.urls[0], nats.urls[1:], [p.pid for p in nats.procs], \
            nats.close
    else:
        mosq = PrivateMosquitto()
        agg_url, device_urls, broker_pids, close_broker = mosq.url, [mosq.url], [mosq.proc.pid], mosq.close
    k = args.time_scale
    job = "fleet"
    agg_state = tmp / "aggregator"
    relay_ids = [f"r{g}" for g in range(args.relays)]
    aggregator_key, relay_keys = provision(agg_state, relay_ids, tmp / "keys")
    for g, rid in enumerate(relay_ids):  # each relay's key, enrolled with the root, in its own state directory
        (tmp / f"relay-{g}").mkdir()
        relay_keys[rid].save(tmp / f"relay-{g}" / "aggregator.key")
    per_round = max(1, round(args.devices * args.fraction))
    # A relayed job's selection is each region's: a round waits for the smallest region's share.
    per_region = max(1, round(args.devices // max(1, args.relays) * args.fraction))
    data_args: dict[str, Any] = {"split": "train"}
    if args.data:
        data_args["path"] = args.data
    job_toml = tmp / "job.toml"
    job_toml.write_text(toml({
        "job": {"name": job, "model": "fedge.models:mnist_2nn", "seed": args.seed, "rounds": args.rounds,
                "state_dir": str(agg_state), "linger_s": 0.0},  # stopped by the bench once done
        "selection": {"fraction": args.fraction, "min_clients": per_region if args.relays else
                      per_round if args.fraction < 1 else args.devices,
                      "quorum": args.quorum, "deadline_s": args.deadline / k, "settle_s": args.settle / k,
                      "offline_grace_s": 5.0 / k},
        "training": {"epochs": 1, "batch_size": 10, "lr": args.lr},
        "server": {"mode": args.mode},
        **({"buffered": {"concurrency": args.concurrency or per_round, "buffer_size": args.buffer_size or per_round,
                         "max_staleness": args.max_staleness, "staleness": args.staleness}}
           if args.mode == "buffered" else {}),
        "codec": CODECS[args.codec],
        "evaluate": {"data": "fedge.datasets:mnist", "args": {**({"path": args.data} if args.data else {}),
                                                               "split": "test"}},
        "limits": {"max_devices": max(100000, args.devices), "messages_per_s": 20.0},
        **({"relays": {"min_relays": args.relays, "margin_s": args.deadline / k / 10,
                       "root_key": aggregator_key.to_text()}} if args.relays else {}),
        "broker": {"url": agg_url, "reconnect_min_s": 1.0, "reconnect_max_s": 5.0},
    }))
    # A relay per region, on the node of its devices (its copy of the job's config names that node).
    relay_cmds = []
    for g, rid in enumerate(relay_ids):
        url = device_urls[g % len(device_urls)]
        relay_toml = tmp / f"relay-{g}.toml"
        relay_toml.write_text(job_toml.read_text().replace(f'url = "{agg_url}"', f'url = "{url}"'))
        relay_cmds.append(fedge("--log-level", args.log_level, "relay", "--config", str(relay_toml), "--region",
                                rid, "--state-dir", str(tmp / f"relay-{g}")))
    # One `fedge simulate` per broker node the devices use (one in all on Mosquitto), each a share of the fleet
    # with its own id prefix; the data shards are split between them.
    sims_args = []
    n_groups = args.relays or len(device_urls)  # relayed: a region a simulator
    processes = args.processes or os.cpu_count() or 1
    for g in range(n_groups):
        url = device_urls[g % len(device_urls)]
        share = args.devices // n_groups + (1 if g < args.devices % n_groups else 0)
        region = {"region": relay_ids[g]} if args.relays else {}
        trusted = ({"aggregator_key": relay_keys[relay_ids[g]].public.to_text(),
                    "root_key": aggregator_key.to_text()} if args.relays else
                   {"aggregator_key": aggregator_key.to_text()})
        agent_toml = tmp / f"agent-{g}.toml"
        agent_toml.write_text(toml({
            "agent": {"id": f"sim{g}" if n_groups > 1 else "sim", "job": job, "state_dir": str(tmp / f"devices-{g}"),
                      **region, "receipts_qos": args.receipts_qos,
                      "model": "fedge.models:mnist_2nn", "resend_after_s": max(5.0, args.resend / k),
                      "model_wait_s": max(5.0, args.model_wait / k)},
            "data": {"factory": "fedge.datasets:mnist", "args": {**data_args, "partition": "iid"}},
            "identity": trusted,
            "worker": {"threads": 1},
            "broker": {"url": url, "reconnect_min_s": 1.0, "reconnect_max_s": 10.0, "keepalive_s": 60},
        }))
        sims_args.append(["--log-level", args.log_level, "simulate", "--config", str(agent_toml),
                          "--devices", str(share), "--profile", args.preset, "--time-scale", str(k),
                          "--seed", str(args.seed + g),
                          "--processes", str(max(1, processes // n_groups))])
    # The devices' keys are enrolled where their messages are checked: with their region's relay, or the root.
    enrolled_at = [tmp / f"relay-{g}" for g in range(n_groups)] if args.relays else [agg_state] * n_groups
    t = time.monotonic()
    for g, sim_args in enumerate(sims_args):
        subprocess.run(fedge(*sim_args, "--make-keys"), env=env, check=True)
        subprocess.run(fedge("--log-level", "WARNING", "enroll", "--config", str(job_toml), "--set",
                             f"job.state_dir={enrolled_at[g]}", "--from",
                             str(tmp / f"devices-{g}" / "fleet-keys.txt")), env=env, check=True,
                       stdout=subprocess.DEVNULL)
    setup_s = time.monotonic() - t

    logs = tmp / "logs"
    logs.mkdir()
    agg_cmd = fedge("--log-level", args.log_level, "aggregator", "--config", str(job_toml))
    if args.profile_aggregator:  # cProfile of the aggregator's main thread, for finding where its CPU goes
        # The main thread's CPU time (time.thread_time), not wall time: its waits for the GIL are not its cost.
        agg_cmd[1:3] = ["-c", "import cProfile, runpy, sys, time\n"
                        "p = cProfile.Profile(time.thread_time)\np.enable()\n"
                        "try:\n    runpy.run_module('fedge_cli', run_name='__main__')\n"
                        f"finally:\n    p.disable()\n    p.dump_stats({args.profile_aggregator!r})\n"]
    agg = subprocess.Popen(agg_cmd, env=env,
                           stderr=(logs / "aggregator.log").open("wb"))
    relays = [subprocess.Popen(cmd, env=env, stderr=(logs / f"relay-{g}.log").open("wb"))
              for g, cmd in enumerate(relay_cmds)]
    start = time.monotonic()
    watch = ReceiptWatch(agg_url, job, agg.pid)
    sims = [subprocess.Popen(fedge(*sim_args, "--summary", str(tmp / f"sim-{g}.json")), env=env,
                             stderr=(logs / f"simulate-{g}.log").open("wb"), start_new_session=True)
            for g, sim_args in enumerate(sims_args)]
    records: list[dict[str, Any]] = []
    cpu_at: list[float | None] = []
    relay_cpu_at: list[list[float | None]] = []
    rounds_file = agg_state / "rounds.jsonl"
    cpu0 = cpu_seconds(agg.pid) or 0.0
    deadline = start + args.timeout
    reached: dict[str, Any] | None = None
    done = False
    try:
        while agg.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            lines = rounds_file.read_text().splitlines() if rounds_file.exists() else []
            for line in lines[len(records):]:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                records.append(rec)
                cpu_at.append(cpu_seconds(agg.pid))
                relay_cpu_at.append([cpu_seconds(r.pid) for r in relays])
                rec["_wall_s"] = time.monotonic() - start
                devices_in = rec["relayed"] if rec.get("relayed") else {"devices": rec["clients"],
                                                                        "selected": rec["selected"]}
                note(f"round {rec['round']}: {devices_in['devices']}/{devices_in['selected']} folded, "
                     f"accuracy {rec.get('accuracy')}, {rec['_wall_s']:.0f} s")
                if args.target and reached is None and (rec.get("accuracy") or 0) >= args.target:
                    reached = {"round": rec["round"], "wall_s": round(rec["_wall_s"], 2),
                               "fleet_s": round(rec["_wall_s"] * k, 1)}
                if (args.stop_at_target and reached is not None) or (
                        rec["round"] >= args.rounds and rec["status"] == "ok"):
                    done = True
            if done:
                break
        timed_out = not done
        agg_peak = peak_rss_mb(agg.pid)
        broker_peak = sum(peak_rss_mb(pid) or 0 for pid in broker_pids)
        agg_cpu_end = cpu_seconds(agg.pid)
        agg_threads = thread_cpu(agg.pid)
        relays_peak = [peak_rss_mb(r.pid) for r in relays]
    finally:
        watch.close()
        for r in relays:
            if r.poll() is None:
                r.send_signal(signal.SIGTERM)
        for r in relays:
            try:
                r.wait(30)
            except subprocess.TimeoutExpired:
                r.kill()
        if agg.poll() is None:
            agg.send_signal(signal.SIGTERM)
        try:
            agg.wait(30)
        except subprocess.TimeoutExpired:
            agg.kill()
        for sim in sims:
            if sim.poll() is None:
                os.killpg(sim.pid, signal.SIGTERM)
        for sim in sims:
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(sim.pid, signal.SIGKILL)
                sim.wait()
        close_broker()
    wall = time.monotonic() - start
    parts = []
    for g in range(len(sims)):
        try:
            parts.append(json.loads((tmp / f"sim-{g}.json").read_text()))
        except (OSError, ValueError):
            parts.append(None)
    sim_summary = (parts[0] if len(parts) == 1 else merge(parts)) if any(parts) else None

    out_rounds = []
    prev = cpu0
    prev_relays: float | None = None
    contributed: set[str] = set()
    for g in range(args.relays):  # a relayed job's devices: in their relays' records
        for line in (tmp / f"relay-{g}" / "rounds.jsonl").read_text().splitlines() \
                if (tmp / f"relay-{g}" / "rounds.jsonl").exists() else []:
            with contextlib.suppress(ValueError):
                contributed.update(json.loads(line).get("accepted") or [])
    for rec, cpu, relay_cpu in zip(records, cpu_at, relay_cpu_at, strict=True):
        relays_now = None if not relay_cpu or None in relay_cpu else sum(c for c in relay_cpu if c is not None)
        relayed = rec.get("relayed")
        refused = dict(rec.get("rejected") or {})
        if rec.get("declined"):
            refused["declined"] = rec["declined"]
        if rec.get("late"):
            refused["late"] = rec["late"]
        if relayed is None:
            contributed.update(rec.get("accepted") or [])
        buffered = rec.get("buffered")
        # A buffered version selects nobody: its updates answer tasks asked in this version or before.
        asked = rec["selected"] if buffered is None else rec["clients"] + sum(refused.values())
        folded_n = rec["clients"]
        if relayed is not None:  # the root's record counts relays; its regions, the devices
            asked, folded_n = relayed["selected"], relayed["devices"]
            for region in relayed["regions"].values():
                for why in ("declined", "late", "rejected"):
                    if region.get(why):
                        refused[f"{why}_in_regions"] = refused.get(f"{why}_in_regions", 0) + region[why]
        out_rounds.append({
            "round": rec["round"], "attempt": rec.get("attempt"), "status": rec["status"],
            "closed_by": rec.get("closed_by"), "selected": asked, "folded": folded_n,
            "not_folded": asked - folded_n, "refused": refused, "failure": rec.get("failure"),
            **({"relays_folded": rec["clients"],
                "relays_cpu_s": None if relays_now is None or prev_relays is None
                else round(relays_now - prev_relays, 3)} if relayed is not None else {}),
            **({"buffered": buffered} if buffered is not None else {}),
            "accuracy": rec.get("accuracy"), "seconds": rec.get("seconds"), "wall_s": round(rec["_wall_s"], 2),
            "bytes_up": rec.get("bytes_up"), "bytes_down": rec.get("bytes_down"),
            "aggregator_cpu_s": None if cpu is None or prev is None else round(cpu - prev, 3),
            # the aggregator's own account, by stage, since the previous round's record (aggregator.cpu)
            "aggregator_cpu_by_stage_s": rec.get("cpu_seconds") or None,
            **window(watch.rounds.get(rec["round"])),
        })
        prev = cpu if cpu is not None else prev
        prev_relays = relays_now if relays_now is not None else prev_relays
    folded = sum(r["folded"] for r in out_rounds)
    cpu_rounds = [r["aggregator_cpu_s"] for r in out_rounds if r["aggregator_cpu_s"] is not None]
    # Round 1's CPU includes the aggregator's start (imports, the model, the
    # evaluation data): the steady figure is over the later rounds.
    later = out_rounds[1:]
    windows = [r for r in later if r.get("receipts_watched", 0) > 1]
    window_cpu = sum(r["update_window_cpu_s"] for r in windows)
    window_updates = sum(r["receipts_watched"] - 1 for r in windows)
    later_cpu = sum(r["aggregator_cpu_s"] or 0 for r in later)
    later_folded = sum(r["folded"] for r in later)
    stages: dict[str, float] = {}
    for r in later:
        for stage, seconds in (r.get("aggregator_cpu_by_stage_s") or {}).items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    ok = [r for r in out_rounds if r["status"] == "ok"]
    relayed_summary = {}
    if args.relays:
        relay_later = [r["relays_cpu_s"] for r in later if r.get("relays_cpu_s") is not None]
        relayed_summary = {
            "relays": args.relays,
            # The bar: the root's CPU a round, whatever the devices behind its relays.
            "root_cpu_s_per_round_after_round_1": round(later_cpu / len(later), 4) if later else None,
            "relays_cpu_ms_per_update_after_round_1": round(1000 * sum(relay_later) / later_folded, 3)
            if later_folded and relay_later else None,
            "relays_peak_rss_mb": relays_peak,
            "every_round_every_region": all(r.get("relays_folded") == args.relays for r in out_rounds),
        }
    return {
        **relayed_summary,
        "rounds": out_rounds,
        "rounds_ok": len(ok),
        "rounds_run": len(out_rounds),
        "timed_out": timed_out,
        "every_selected_device_folded_or_counted": all(
            r["folded"] + sum(r["refused"].values()) <= r["selected"] for r in out_rounds),
        "devices_folded_total": folded,
        "devices_that_never_contributed": args.devices - len(contributed),
        "aggregator_cpu_s_total": round(sum(cpu_rounds), 3),
        "aggregator_cpu_ms_per_update_after_round_1": round(1000 * later_cpu / later_folded, 3) if later_folded
        else None,
        "aggregator_cpu_ms_per_update_while_updates_arrive": round(1000 * window_cpu / window_updates, 3)
        if window_updates else None,
        "aggregator_cpu_ms_per_update_all_rounds": round(1000 * sum(cpu_rounds) / folded, 3) if folded else None,
        # Whole rounds after the first, by stage, as the aggregator counted them (each round's record)
        "aggregator_cpu_ms_per_update_by_stage_after_round_1": {
            stage: round(1000 * seconds / later_folded, 4)
            for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1])} if later_folded and stages
        else None,
        "aggregator_cpu_s_at_end": None if agg_cpu_end is None else round(agg_cpu_end - cpu0, 3),
        "aggregator_cpu_s_by_thread": agg_threads,
        "aggregator_peak_rss_mb": agg_peak,
        "broker_peak_rss_mb": broker_peak,
        "uplink_bytes_per_update": round(sum(r["bytes_up"] or 0 for r in ok) / max(1, sum(r["folded"] for r in ok))),
        "downlink_bytes_per_device_round": round(sum(r["bytes_down"] or 0 for r in ok) /
                                                 max(1, sum(r["selected"] for r in ok))),
        "device_payload_bytes": device_bytes(sim_summary, args.devices),
        "target": args.target or None,
        "reached_target": reached,
        "final_accuracy": out_rounds[-1]["accuracy"] if out_rounds else None,
        "best_accuracy": max((r["accuracy"] or 0 for r in out_rounds), default=None),
        "wall_s": round(wall, 1),
        "setup_s": round(setup_s, 1),
        "simulator": sim_summary,
    }


def device_bytes(summary: dict[str, Any] | None, devices: int) -> dict[str, Any] | None:
    """MQTT payload bytes the simulated devices sent and received (their own counts), in all and per device."""
    if not summary or not summary.get("payload_bytes"):
        return None
    by = summary["payload_bytes"]
    sent = sum(v for k, v in by.items() if k.startswith("out_"))
    received = sum(v for k, v in by.items() if k.startswith("in_"))
    return {"sent": sent, "received": received, "sent_per_device": round(sent / devices),
            "received_per_device": round(received / devices), "by_channel": by}


def window(r: dict[str, float] | None) -> dict[str, Any]:
    """A round's receipts window: the aggregator's CPU from its first receipt to its last."""
    if r is None:
        return {}
    return {"receipts_watched": int(r["receipts"]), "update_window_cpu_s": round(r["last_cpu"] - r["first_cpu"], 3),
            "update_window_cpu_ms_per_update": round(1000 * (r["last_cpu"] - r["first_cpu"]) / (r["receipts"] - 1), 3)
            if r["receipts"] > 1 else None}


def parser() -> argparse.ArgumentParser:
    """The bench's options (``bench/buffered.py`` runs it with its own)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--preset", default="lab", help="fleet profile: a preset name or a TOML file")
    p.add_argument("--out", default=None)
    p.add_argument("--fraction", type=float, default=1.0, help="share of the online devices selected a round")
    p.add_argument("--quorum", type=float, default=1.0)
    p.add_argument("--deadline", type=float, default=600.0, help="round deadline in fleet seconds")
    p.add_argument("--settle", type=float, default=2.0, help="selection settle time in fleet seconds")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--resend", type=float, default=20.0, help="agent.resend_after_s in fleet seconds")
    p.add_argument("--model-wait", type=float, default=30.0,
                   help="agent.model_wait_s in fleet seconds (raise it where the first download of every device "
                        "takes the broker and the simulator longer than that)")
    p.add_argument("--codec", default="default", choices=sorted(CODECS))
    p.add_argument("--mode", default="synchronous", choices=["synchronous", "buffered"], help="server.mode")
    p.add_argument("--concurrency", type=int, default=0,
                   help="buffered: devices training at once (default: devices x fraction, as a round selects)")
    p.add_argument("--buffer-size", type=int, default=0, help="buffered: updates a version (default: as concurrency)")
    p.add_argument("--max-staleness", type=int, default=10, help="buffered: the stalest update taken, in versions")
    p.add_argument("--staleness", default="polynomial", help="buffered: polynomial, constant or hinge")
    p.add_argument("--relays", type=int, default=0,
                   help="a relayed job: this many relays (fedge relay), a region each with its share of the devices "
                        "and its own simulator, on its devices' node; the aggregator is their root")
    p.add_argument("--receipts-qos", type=int, default=1, choices=[0, 1],
                   help="agent.receipts_qos: 0 leaves a device no QoS 1 subscription (none a JetStream consumer)")
    p.add_argument("--nats-stream-replicas", type=int, default=0, metavar="N",
                   help="nats3: the MQTT gateway's streams (sessions, retained and QoS 1 messages) on N nodes "
                        "(mqtt.stream_replicas; default 0: NATS's own, 3 on three nodes)")
    p.add_argument("--broker", default="mosquitto", choices=["mosquitto", "nats3"],
                   help="a private Mosquitto, or a 3-node NATS JetStream cluster with its MQTT gateway (the "
                        "aggregator on node 0, the devices half and half on nodes 1 and 2; no round has opened on it "
                        "yet: see docs/explanation/benchmarks.md)")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--target", type=float, default=0.0, help="accuracy whose first round is reported (0: none)")
    p.add_argument("--stop-at-target", action="store_true")
    p.add_argument("--processes", type=int, default=0, help="simulator processes (default: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="wall seconds before the job is stopped")
    p.add_argument("--data", default=None, help="mnist.npz (default: $FEDGE_DATA/mnist.npz)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR (new) and keep it: state, logs and the brokers' logs")
    p.add_argument("--log-level", default="WARNING", help="the aggregator's and the simulators' log level")
    p.add_argument("--profile-aggregator", default=None, metavar="FILE",
                   help="run the aggregator under cProfile and write its profile here (slows it)")
    return p


def main() -> None:
    args = parser().parse_args()
    if not args.data and not os.environ.get("FEDGE_DATA"):
        raise SystemExit("MNIST: pass --data PATH or set FEDGE_DATA to the directory holding mnist.npz")
    setup = {"devices": args.devices, "rounds": args.rounds, "preset": args.preset, "fraction": args.fraction,
             "quorum": args.quorum, "deadline_fleet_s": args.deadline, "time_scale": args.time_scale,
             "codec": CODECS[args.codec], "model": "fedge.models:mnist_2nn", "split": "iid",
             "examples_per_device": 60000 // args.devices, "E": 1, "B": 10, "lr": args.lr,
             "processes": args.processes or os.cpu_count(),
             "broker": "mosquitto (private, loopback)" if args.broker == "mosquitto" else
             "NATS JetStream cluster of 3 nodes (MQTT gateway, loopback): aggregator on node 0, devices on 1 and 2",
             "relays": args.relays or None, "receipts_qos": args.receipts_qos,
             **({"nats_mqtt_settings": [line.strip() for line in MQTT_FLEET_SETTINGS.splitlines() if line.strip()] + (
                 [f"stream_replicas: {args.nats_stream_replicas}"] if args.nats_stream_replicas else [])}
                if args.broker == "nats3" else {}),
             "agent": {"resend_after_fleet_s": args.resend, "model_wait_fleet_s": args.model_wait},
             "trust": "signatures on, default defences"}
    with contextlib.ExitStack() as stack:
        if args.keep:  # the work directory (state, logs, the brokers' logs) stays for a look afterwards
            Path(args.keep).mkdir(parents=True, exist_ok=False)
            tmp = args.keep
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedge-bench-fleet-"))
        result = run(args, Path(tmp))
        if result["rounds_run"] < args.rounds and not (args.stop_at_target and result["reached_target"]):
            for log_file in sorted((Path(tmp) / "logs").glob("*.log")):
                name = log_file.name
                text = log_file.read_text(errors="replace")
                result.setdefault("log_tails", {})[name] = text.splitlines()[-30:]
    emit({"benchmark": "fleet", "setup": setup, "machine": machine(), **result}, args.out)


if __name__ == "__main__":
    main()
