"""Secure aggregation's protocol cost, without a broker: what one device and
the aggregator compute, and how many bytes each device sends and receives
per round, at 10 to 300 devices.

The real protocol code runs in process (``edge_agent.secure.SecureSession``
on each device, ``aggregator.secure.SecureRound`` on the aggregator), and
every message goes through its wire encoding, so the byte counts are what an
MQTT payload would carry (before chunking). ``--dropout`` of the devices go
silent after sending their shares, so that unmasking must rebuild their
mask keys from shares (the expensive path). The plan: ``bits`` per
coordinate, the SecAgg+ degree ``2 ceil(log2 n) + 2`` (everyone below 10
devices), threshold a majority of a device's share holders.

Compare the masked input with the same update under the job's default
codec (int2 + zlib): masked data look uniform and do not compress.

``--mode rounds`` runs real jobs instead: a private Mosquitto, the
aggregator service and N real agents (each its own MQTT connection, signed
messages, real training in a pool of two workers), each job once with plain
rounds (the job's default int2 + zlib uplink) and once with secure
aggregation, and reports wall time per round (announcement to close, the
median after the first round, which loads the workers) and MQTT payload
bytes per device per round, up and down (the mnist_2nn job reads
``--mnist``, by default ``$FEDGE_DATA/mnist.npz``). ``--mode accuracy``
runs the demo workload (10 agents, digits, 30 rounds) with and without
secure aggregation over several seeds: secure aggregation must not cost
accuracy.

    python bench/secagg.py --out bench/results/secagg_protocol.json
    python bench/secagg.py --mode rounds --out bench/results/secagg_rounds.json
    python bench/secagg.py --mode accuracy --out bench/results/secagg_accuracy.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, machine, note

MODELS = {"digits_mlp": 4_810, "mnist_2nn": 199_210}


def plan_for(n: int, bits: int) -> Any:
    from fedge.secagg import SecAggPlan

    degree = n - 1 if n <= 10 else min(n - 1, 2 * math.ceil(math.log2(n)) + 2)
    threshold = (degree + 1) // 2 + 1
    return SecAggPlan.for_devices(n, threshold, degree, bits, 1.0)


def one(n: int, count: int, bits: int, dropout: float, seed: int) -> dict[str, Any]:
    from aggregator.secure import SecureRound
    from edge_agent.secure import SecureSession
    from fedge import wire
    from fedge.codecs import make_codec
    from fedge.messages import SecAggStage

    rng = np.random.default_rng(seed)
    plan = plan_for(n, bits)
    ids = [f"d{i:03d}" for i in range(n)]
    dropped = set(rng.choice(ids, size=round(dropout * n), replace=False).tolist()) if dropout else set()
    sessions = {u: SecureSession(u, "bench", 1, 1, plan) for u in ids}
    server = SecureRound("bench", 1, 1, tuple(ids), plan, count, 60.0, now=0.0)
    sent = {u: 0 for u in ids}
    received = {u: 0 for u in ids}
    device_s = {u: 0.0 for u in ids}
    server_s = 0.0

    def to_server(u: str, msg: SecAggStage) -> None:
        nonlocal server_s
        data = msg.encode()
        sent[u] += len(data)
        t = time.perf_counter()
        assert server.on_stage(u, SecAggStage.parse(wire.decode(data))) is None
        server_s += time.perf_counter() - t

    def advance(now: float, inputs_closed: bool = False) -> None:
        nonlocal server_s
        t = time.perf_counter()
        out = server.advance(now, inputs_closed)
        server_s += time.perf_counter() - t
        for msg in out:
            data = msg.encode()
            received[msg.client] += len(data)
            if msg.client in dropped and msg.stage == "survivors":
                continue
            t = time.perf_counter()
            reply = sessions[msg.client].on_stage(SecAggStage.parse(wire.decode(data)))
            device_s[msg.client] += time.perf_counter() - t
            replies[msg.client] = reply

    replies: dict[str, Any] = {}
    for u in ids:
        t = time.perf_counter()
        msg = sessions[u].keys()
        device_s[u] += time.perf_counter() - t
        to_server(u, msg)
    advance(0.0)
    for u in ids:
        to_server(u, replies[u])
    advance(0.0)
    updates = {u: rng.uniform(-0.05, 0.05, count) for u in ids}
    for u in ids:
        if u in dropped:
            continue
        t = time.perf_counter()
        sessions[u].set_update(updates[u], rng)
        body = sessions[u].masked_body()
        device_s[u] += time.perf_counter() - t
        assert body is not None
        sent[u] += len(body)
        t = time.perf_counter()
        assert server.on_input(u, body) is None
        server_s += time.perf_counter() - t
    advance(0.0, inputs_closed=True)
    for u in sorted(server.server.survivors):
        to_server(u, replies[u])
    advance(0.0)
    t = time.perf_counter()
    total = server.result()
    server_s += time.perf_counter() - t
    assert server.stage == "done", server.failure
    from fedge.secagg import dequantize

    want = sum(updates[u] for u in ids if u not in dropped)
    err = float(np.abs(dequantize(total, plan) - want).max())
    int2 = len(make_codec({"name": "int2", "lossless": "zlib"}).encode({"w": updates[ids[0]].astype(np.float32)}, rng))
    alive = [u for u in ids if u not in dropped]
    return {
        "devices": n, "parameters": count, "bits": bits, "modulus_bits": plan.modulus_bits,
        "degree": plan.degree, "threshold": plan.threshold, "dropped": len(dropped),
        "device_seconds_median": round(statistics.median(device_s[u] for u in alive), 4),
        "aggregator_seconds": round(server_s, 3),
        "device_bytes_sent_median": int(statistics.median(sent[u] for u in alive)),
        "device_bytes_received_median": int(statistics.median(received[u] for u in alive)),
        "masked_input_bytes": (count * plan.modulus_bits + 7) // 8,
        "int2_zlib_update_bytes": int2,
        "float32_update_bytes": 4 * count,
        "max_abs_error_of_the_sum": err,
        "error_bound": len(alive) / plan.scale,
    }


JOBS = {
    # model: (factory, data, data args, training, evaluation args); MNIST's path is added from --mnist
    "digits_mlp": ("fedge.models:digits_mlp", "fedge.datasets:digits", {"partition": "iid"},
                   {"epochs": 2, "batch_size": 16, "lr": 0.1}, {"split": "test"}),
    "mnist_2nn": ("fedge.models:mnist_2nn", "fedge.datasets:mnist", {"partition": "iid"},
                  {"epochs": 1, "batch_size": 10, "lr": 0.1}, {"split": "test"}),
}


def job_rounds(url: str, model: str, n: int, rounds: int, secure: bool, seed: int, tmp: Path,
               mnist: str | None = None) -> dict[str, Any]:
    """One real job over ``url``: per-round seconds and bytes per device
    (``mnist``: the MNIST file of the mnist_2nn job)."""
    import threading

    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService
    from edge_agent.pool import TrainingPool
    from edge_agent.runtime import AgentRuntime, DeviceSpec
    from fedge.config import BrokerSettings, updated
    from fedge_cli.identity import provision

    factory, data, data_args, training, eval_args = JOBS[model]
    if data == "fedge.datasets:mnist":
        data_args, eval_args = {**data_args, "path": mnist}, {**eval_args, "path": mnist}
    state = tmp / f"{model}-{n}-{'secure' if secure else 'plain'}-{seed}"
    cfg = updated(AggregatorConfig(), job={"name": "bench-secagg", "model": factory, "rounds": rounds, "seed": seed,
                                            "state_dir": str(state / "aggregator")},
                  selection={"min_clients": n, "deadline_s": 600.0, "settle_s": 2.0},
                  training=training, evaluate={"data": data, "args": eval_args},
                  limits={"messages_per_s": 50.0}, broker={"url": url})
    if secure:
        cfg = updated(cfg, secagg={"mode": "on", "bound": 0.5, "stage_s": 120.0},
                      server={"clip": "off", "direction": "off", "weight_cap": 0.0})
    ids = [f"d{i:03d}" for i in range(n)]
    aggregator_key, keys = provision(state / "aggregator", ids, state / "keys")
    specs = [DeviceSpec(client_id=c, job="bench-secagg", data=data,
                        data_args={"client": i, "clients": n, "seed": seed, **data_args},
                        state_dir=state / "agents" / c, durable=False, identity=keys[c],
                        aggregator_key=aggregator_key, downlink="follow")
             for i, c in enumerate(ids)]
    records: list[Any] = []
    service = AggregatorService(cfg, on_record=records.append)
    pool = TrainingPool(size=2, mode="warm", threads=1)
    fleet = AgentRuntime(specs, BrokerSettings(url=url), pool)
    threads = [threading.Thread(target=service.run, daemon=True), threading.Thread(target=fleet.run, daemon=True)]
    fleet.start()
    for t in threads:
        t.start()
    try:
        if not service.done.wait(600 + 120 * rounds):
            raise SystemExit(f"{model} n={n} secure={secure}: the job did not finish: {records}")
    finally:
        service.stop()
        fleet.stop()
        for t in threads:
            t.join(30)
        fleet.close()
        pool.close()
    steady = records[1:] or records
    up = [fleet.traffic.get(r.round, [0, 0])[0] / n for r in steady]
    down = [fleet.traffic.get(r.round, [0, 0])[1] / n for r in steady]
    out = {"model": model, "devices": n, "secure": secure, "rounds": len(records),
           "status": [r.status for r in records],
           "round_seconds_median": round(statistics.median(r.seconds for r in steady), 3),
           "round_seconds": [round(r.seconds, 3) for r in records],
           "device_bytes_up_per_round": int(statistics.median(up)),
           "device_bytes_down_per_round": int(statistics.median(down)),
           "accuracy": [r.accuracy for r in records]}
    if secure:
        out["secagg"] = records[-1].extra.get("secagg")
    return out


def rounds_mode(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from bench._common import PrivateMosquitto

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-secagg-") as tmp:
        for model in args.models.split(","):
            for n in (int(x) for x in args.devices.split(",")):
                for secure in (False, True):
                    mosq = PrivateMosquitto()
                    try:
                        row = job_rounds(mosq.url, model, n, args.rounds, secure, args.seed, Path(tmp), args.mnist)
                    finally:
                        mosq.close()
                    note(f"{model} n={n} {'secure' if secure else 'plain'}: {row['round_seconds_median']} s/round, "
                          f"up {row['device_bytes_up_per_round']} B, down {row['device_bytes_down_per_round']} B "
                          f"per device")
                    rows.append(row)
    return {"benchmark": "secagg rounds over Mosquitto", "machine": machine(), "rounds": args.rounds,
            "results": rows}


def accuracy_mode(args: argparse.Namespace) -> dict[str, Any]:
    import io

    from bench._common import PrivateMosquitto
    from fedge_cli.demo import DemoOptions, run_demo

    rows = []
    for seed in range(args.seeds):
        for secure in (False, True):
            mosq = PrivateMosquitto()
            try:
                summary = run_demo(DemoOptions(broker=mosq.url, seed=seed, secure_aggregation=secure),
                                   out=io.StringIO())
            finally:
                mosq.close()
            rows.append({"seed": seed, "secure": secure, "final_accuracy": summary["final_accuracy"],
                         "best_accuracy": summary["best_accuracy"],
                         "median_round_seconds": summary["median_round_seconds"]})
            note(rows[-1])
    summary_rows = {}
    for secure in (False, True):
        accs = [r["final_accuracy"] for r in rows if r["secure"] == secure]
        summary_rows["secure" if secure else "plain"] = {
            "final_accuracy_mean": round(statistics.mean(accs), 4),
            "final_accuracy_min": round(min(accs), 4), "final_accuracy_max": round(max(accs), 4)}
    return {"benchmark": "secagg accuracy (the demo workload)", "machine": machine(), "runs": rows,
            "summary": summary_rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="protocol", choices=["protocol", "rounds", "accuracy"])
    p.add_argument("--devices", default="10,50,100,300")
    p.add_argument("--models", default="digits_mlp,mnist_2nn")
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1, help="protocol mode: devices that drop after sharing")
    p.add_argument("--rounds", type=int, default=3, help="rounds mode: rounds per job")
    p.add_argument("--seeds", type=int, default=3, help="accuracy mode: seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist", default=os.path.join(os.environ["FEDGE_DATA"], "mnist.npz")
                   if os.environ.get("FEDGE_DATA") else None,
                   help="rounds mode, mnist_2nn: the MNIST .npz (default: $FEDGE_DATA/mnist.npz)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.mode == "rounds":
        if "mnist_2nn" in args.models.split(",") and not (args.mnist and os.path.isfile(args.mnist)):
            found = f" ({args.mnist} not found)" if args.mnist else ""
            raise SystemExit(f"bench/secagg.py --mode rounds needs MNIST for mnist_2nn{found}: pass --mnist PATH or "
                             "set FEDGE_DATA to the directory that holds mnist.npz (or --models digits_mlp)")
        emit(rounds_mode(args), args.out)
        return
    if args.mode == "accuracy":
        emit(accuracy_mode(args), args.out)
        return
    rows = []
    for model in args.models.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            row = {"model": model, **one(n, MODELS[model], args.bits, args.dropout, args.seed)}
            note(f"{model} n={n}: device {row['device_seconds_median']} s, aggregator {row['aggregator_seconds']} s, "
                  f"sent {row['device_bytes_sent_median']} B")
            rows.append(row)
    emit({"benchmark": "secagg protocol (no broker)", "machine": machine(), "dropout": args.dropout,
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
