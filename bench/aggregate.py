"""Aggregator throughput and memory: int8 updates of the FedAvg paper's MNIST
CNN (1,663,370 parameters) arriving over a real local Mosquitto.

For each fleet size N the benchmark starts a private Mosquitto and a real
`fedge aggregator` process (job: mnist_cnn, fraction 1, quorum 1, codec
int8, no evaluation). N simulated clients announce themselves, wait for the
round, and publish one int8 update each (real wire format and chunking),
from a few MQTT connections in this process. Throughput is N over the time
from the first update published to the aggregator's receipt for the last
one (the aggregator acknowledges an update after folding it), so it covers
transport, reassembly, hashing, signature checks, validation and folding.
Signing is on, as by default: each client has its own enrolled Ed25519 key
and signs its presence and updates; ``--signing off`` measures without.
Peak RSS is the
aggregator process's VmHWM. Each size runs several rounds in one aggregator
and reports the median.

Bars (docs/explanation/architecture.md): >= 100 updates/s; peak RSS flat as N grows.

    python bench/aggregate.py [--clients 20 100 200] [--publishers 8] [--signing off] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import AggregatorConfig
from bench._common import REPO, PrivateMosquitto, emit, free_port, machine, note
from fedge import chunks, wire
from fedge.chunks import Reassembler
from fedge.codecs import make_codec, parse_spec, supported
from fedge.messages import GlobalModel, RoundAnnouncement, Status, Update, parse_event
from fedge.topics import JobTopics
from fedge_cli.identity import provision

JOB = "agg-bench"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def connect(port: int, name: str, on_message=None) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
    c.max_inflight_messages_set(64)
    if on_message:
        c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def toml_table(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"


def run_one(n: int, publishers: int, rounds: int, workdir: Path, downlink: dict | None = None,
            signing: str = "required", metrics: bool = False, model: str = "fedge.models:mnist_cnn",
            codec: dict | None = None) -> dict:
    mosq = PrivateMosquitto()
    metrics_port = free_port()
    topics = JobTopics(JOB)
    state = workdir / f"agg-{n}"
    conf = workdir / f"job-{n}.toml"
    conf.write_text(
        f'[job]\nname = "{JOB}"\nmodel = "{model}"\nrounds = {rounds + 1}\nstate_dir = "{state}"\n'
        f'[selection]\nmin_clients = {n}\nfraction = 1.0\nquorum = 1.0\ndeadline_s = 600\nsettle_s = 1.0\n'
        + (f'[codec]\nname = "{codec["name"]}"\n'
           f'params = {toml_table({k: v for k, v in codec.items() if k != "name"})}\n' if codec else "")
        + (f"[downlink]\ncodec = {toml_table(downlink)}\n" if downlink else "")
        + f'[broker]\nurl = "{mosq.url}"\n'
        + f'[identity]\nsigning = "{signing}"\n'
        + (f"[metrics]\nenabled = true\nport = {metrics_port}\n" if metrics else "")
    )
    clients = [f"c{i:0{max(4, len(str(n - 1)))}d}" for i in range(n)]
    # Signed (the default): every client has its own key, enrolled; it signs
    # its presence and updates (before the clock starts, as it encodes them)
    # and the aggregator verifies each one.
    keys = provision(state, clients, workdir / f"keys-{n}")[1] if signing == "required" else {}

    def sign(c: str, msg: bytes) -> bytes:
        return wire.seal(msg, keys[c]) if keys else msg

    env = dict(os.environ, PYTHONPATH=str(REPO))
    level = os.environ.get("FEDGE_BENCH_LOG", "WARNING")
    agg = subprocess.Popen([sys.executable, "-m", "fedge_cli", "--log-level", level, "aggregator",
                            "--config", str(conf)], env=env)
    inbox: queue.Queue = queue.Queue()
    watcher = connect(mosq.port, "bench-watch", lambda c, u, m: inbox.put((time.perf_counter(), m.topic, m.payload)))
    watcher.subscribe([(topics.round, 1), (topics.events, 1), (topics.key_filter, 1), (f"{topics.base}/ack/+", 1)])
    conns = [connect(mosq.port, f"bench-pub-{i}") for i in range(publishers)]
    models = Reassembler()
    latest: dict = {"ann": None, "key": None}

    def absorb(topic: str, payload: bytes) -> None:
        """Keep the newest announcement and the key model (for the tensor
        shapes), whichever loop hears them."""
        if topic == topics.round:
            latest["ann"] = RoundAnnouncement.parse(wire.decode(payload))
        elif topics.parse(topic)[0] == "key" and payload and (whole := models.feed("key", payload, 0.0)):
            latest["key"] = GlobalModel.parse(wire.decode(whole))

    measured = []
    scrapes = {"ok": 0, "failed": 0}
    scraping = threading.Event()

    def scrape() -> None:  # as Prometheus would, every second, while the aggregator folds
        while not scraping.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                    r.read()
                scrapes["ok"] += 1
            except OSError:
                scrapes["failed"] += 1

    if metrics:
        threading.Thread(target=scrape, daemon=True).start()
    try:
        info = {"codecs": supported(), "role": "trainer"}
        for i, c in enumerate(clients):
            presence = sign(c, Status(c, "online", info, int(time.time() * 1000)).encode())
            conns[i % publishers].publish(topics.status(c), presence, qos=1, retain=True)
        rss_ready = 0.0
        last_round = 0
        for _ in range(rounds):
            def ready(after: int) -> bool:
                a = latest["ann"]
                return a is not None and a.state == "open" and a.round > after and latest["key"] is not None

            while not ready(last_round):
                absorb(*inbox.get(timeout=300)[1:])
            ann, spec = latest["ann"], latest["key"].spec
            assert ann.selected_count == n, f"selected {ann.selected_count} of {n}"
            last_round = ann.round
            rss_ready = rss_ready or vm(agg.pid, "VmRSS")
            # Every client's update, encoded before the clock starts.
            codec = make_codec(ann.codec)
            rng = np.random.default_rng(ann.round)
            base = {k: (rng.normal(size=s) * 0.01).astype(np.float32) for k, s in spec.entries}
            data_size = chunks.chunk_data_size(262144)
            payloads: list[list[tuple[str, bytes]]] = [[] for _ in range(publishers)]
            for i, c in enumerate(clients):
                body = codec.encode(base, np.random.default_rng([ann.round, i]))
                msg = sign(c, Update(job=JOB, round=ann.round, sender=c, update_id=f"u{ann.round}-{i}",
                                     num_samples=600, codec=ann.codec, base_model=ann.model_digest,
                                     body=body).encode())
                payloads[i % publishers].extend((topics.update(c), p) for p in chunks.split(msg, data_size))

            sent: list[float] = []

            def publish(k: int, batch=payloads, sent=sent) -> None:
                for inf in [conns[k].publish(t, p, qos=1) for t, p in batch[k]]:
                    inf.wait_for_publish(600)
                sent.append(time.perf_counter())

            threads = [threading.Thread(target=publish, args=(k,)) for k in range(publishers)]
            t0, cpu0 = time.perf_counter(), cpu_seconds(agg.pid)
            cpu_folded = cpu0
            for t in threads:
                t.start()
            acked, first_ack, last_ack, record = 0, t0, t0, None
            while record is None:
                stamp, topic, payload = inbox.get(timeout=600)
                if topics.parse(topic)[0] == "ack":
                    if wire.decode(payload).kind != wire.Kind.ACK:
                        continue  # a round of more than selection.list_max invites each device there
                    acked += 1
                    first_ack = stamp if acked == 1 else first_ack
                    last_ack = stamp
                    if acked == n:
                        cpu_folded = cpu_seconds(agg.pid)
                elif topic == topics.events:
                    record, closed = parse_event(wire.decode(payload)), stamp
                else:
                    absorb(topic, payload)
            for t in threads:
                t.join()
            fold_s = last_ack - t0
            measured.append({"round": ann.round, "accepted": record["clients"], "receipts": acked,
                             "fold_seconds": round(fold_s, 3), "updates_per_s": round(n / fold_s, 1),
                             "aggregator_cpu_ms_per_update": round(1000 * (cpu_folded - cpu0) / n, 2),
                             "close_seconds": round(closed - last_ack, 3),
                             "first_receipt_seconds": round(first_ack - t0, 3),
                             "publish_seconds": round(max(sent) - t0, 3)})
        peak = vm(agg.pid, "VmHWM")
        rates = sorted(m["updates_per_s"] for m in measured)
        return {
            "clients": n,
            "parameters": spec.num_params,
            "update_bytes": len(msg),
            "updates_per_s": {"median": statistics.median(rates), "min": rates[0], "max": rates[-1]},
            "aggregator_cpu_ms_per_update_median": statistics.median(
                m["aggregator_cpu_ms_per_update"] for m in measured),
            "megabytes_per_s_median": round(statistics.median(rates) * len(msg) / 1e6, 1),
            "round_close_seconds_median": statistics.median(m["close_seconds"] for m in measured),
            "aggregator_rss_mb_ready": round(rss_ready, 1),
            "aggregator_peak_rss_mb": round(peak, 1),
            "rounds": measured,
            **({"metrics_scrapes": dict(scrapes)} if metrics else {}),
        }
    finally:
        scraping.set()
        agg.send_signal(signal.SIGTERM)
        try:
            agg.wait(20)
        except subprocess.TimeoutExpired:
            agg.kill()
        for c in [watcher, *conns]:
            c.loop_stop()
            c.disconnect()
        mosq.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 100, 200])
    ap.add_argument("--publishers", type=int, default=8, help="MQTT connections the clients publish through")
    ap.add_argument("--rounds", type=int, default=3, help="rounds measured per fleet size")
    ap.add_argument("--downlink", type=parse_spec, default=None,
                    help='downlink codec, e.g. none (a full model every round); default: the job default')
    ap.add_argument("--signing", default="required", choices=["required", "off"],
                    help="required (default): clients sign, the aggregator verifies; off: neither")
    ap.add_argument("--metrics", action="store_true", help="the aggregator serves Prometheus metrics while it folds")
    ap.add_argument("--model", default="fedge.models:mnist_cnn", help="the job's model factory")
    ap.add_argument("--codec", type=lambda t: {"name": "default"} if t == "default" else parse_spec(t),
                    default={"name": "int8"},
                    help="update codec: a name or JSON, or default (the job default, int2 with zlib)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-bench-agg-") as tmp:
        runs = []
        for n in args.clients:
            note(f"{n} clients, {args.rounds} rounds ...")
            runs.append(run_one(n, args.publishers, args.rounds, Path(tmp), args.downlink, args.signing,
                                args.metrics, args.model, None if args.codec == {"name": "default"} else args.codec))
            note(f"{n} clients: {runs[-1]['updates_per_s']['median']} updates/s")
    peaks = [r["aggregator_peak_rss_mb"] for r in runs]
    slowest = min(r["updates_per_s"]["median"] for r in runs)
    growth = (max(peaks) - min(peaks)) / min(peaks)
    emit({
        "benchmark": "aggregate",
        "workload": {"model": args.model, "parameters": runs[0]["parameters"],
                     "codec": args.codec if args.codec != {"name": "default"} else AggregatorConfig().codec.spec,
                     "downlink": args.downlink or AggregatorConfig().downlink.codec,
                     "publishers": args.publishers, "broker": "mosquitto (private, loopback)",
                     "rounds_per_size": args.rounds,
                     "timing": "updates/s = clients / (last receipt - first publish); the aggregator sends a "
                               "receipt after folding each update. The round close (optimizer step, checkpoint "
                               "with fsync, republishing the model) is reported apart as round_close_seconds. "
                               "aggregator_cpu_ms_per_update: the aggregator process's CPU "
                               "time (user + system, all threads) from the first publish to the last receipt, per "
                               "update: what folding costs, whatever else loads the machine.",
                     "signing": args.signing, "metrics": args.metrics,
                     "note": "aggregator, broker and the publishing clients all share the machine's cores"},
        "machine": machine(),
        "runs": runs,
        "bars": {
            "updates_per_s_ge_100": {"value": slowest, "pass": slowest >= 100},
            "peak_rss_flat": {"value": f"{min(peaks):.0f}-{max(peaks):.0f} MB across {args.clients} clients",
                              "growth": round(growth, 3), "pass": growth < 0.15},
        },
    }, args.out)


if __name__ == "__main__":
    main()
