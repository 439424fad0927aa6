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

This is the protocol's cost only; ``bench/secagg.py`` will grow real rounds
over Mosquitto when secure aggregation is wired into the roles (issue 14).

    python bench/secagg.py --out bench/results/secagg_protocol.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, machine

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="10,50,100,300")
    p.add_argument("--models", default="digits_mlp,mnist_2nn")
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for model in args.models.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            row = {"model": model, **one(n, MODELS[model], args.bits, args.dropout, args.seed)}
            print(f"{model} n={n}: device {row['device_seconds_median']} s, aggregator {row['aggregator_seconds']} s, "
                  f"sent {row['device_bytes_sent_median']} B", file=sys.stderr, flush=True)
            rows.append(row)
    emit({"benchmark": "secagg protocol (no broker)", "machine": machine(), "dropout": args.dropout,
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
