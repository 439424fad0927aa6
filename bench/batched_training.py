"""CPU to train a simulated fleet of MNIST 2NN devices: batched
(``edge_agent.batched``) against one by one (``train_round``, as the
training worker runs it).

Each device holds 60 examples of random MNIST-shaped data (784 floats in
[0, 1), 10 classes: a device's cost does not depend on the pixels) and
trains one round of the 2NN (784-200-200-10, 199,210 parameters) with the
FedAvg paper's setup: E = 1, B = 10, lr 0.1, plain SGD. That is 6 steps a
device. For N devices (``--devices``, default 100, 1000 and 10000):

* batched: ``iter_train_many`` over all N, ``--group-size`` devices a group
  (repeat for several sizes, one run each; 0 is ``auto_group_size``, 10 for
  the 2NN; default 0 and 256); every delta is dropped as it arrives, as a
  simulator that encodes and publishes it would;
* one by one: ``load_federated`` + ``train_round`` + the delta as
  ``federated_arrays`` (the worker's path without the wire), only for
  N <= ``--loop-max`` (1000; nothing is extrapolated: a size that did not
  run is not reported).

Every run is a fresh process (one heap, one warm-up of 8 devices, not
measured). Reported: its CPU seconds (``time.process_time``, all torch
threads) and wall seconds, in total and per device; its peak resident memory
above what it held before the run (sampled every 10 ms), of which
``kept_deltas_mb`` are the copies of the first 20 deltas kept for the
comparison, and the rest per device of a group (while a group trains, the previous group's buffer lives on until
its last delta is dropped: the peak is about two groups); the estimate
``bytes_per_device``; for batched runs, the largest difference between the
batched and ``train_round``'s deltas of the first 20 devices, relative to the
delta's scale. Torch threads are what ``--threads`` sets (default: torch's
own choice).

    python bench/batched_training.py [--devices 100 --devices 1000 --devices 10000] [--group-size 0]
                                     [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, machine, note

MODEL = "fedge.models:mnist_2nn"
EXAMPLES = 60
POOL = 60_000  # MNIST's training set size: devices take 60-example slices (views) of it, round robin
CHECKED = 20  # devices whose batched and one-by-one deltas are compared
PLAN = {"epochs": 1, "batch_size": 10, "lr": 0.1}  # the FedAvg paper's 2NN: E = 1, B = 10


class PeakRss:
    """This process's resident memory, sampled every 10 ms while a run lasts;
    ``growth`` is its peak above the value at the start (ru_maxrss cannot
    tell one run's peak from an earlier one's)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.now()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def sample(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def fleet(n: int) -> tuple[list[Any], list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(POOL, 784, generator=gen)
    y = torch.randint(0, 10, (POOL,), generator=gen)
    data = []
    for i in range(n):
        start = (i * EXAMPLES) % POOL
        data.append((x[start : start + EXAMPLES], y[start : start + EXAMPLES]))
    return data, list(range(n))


def batched(model: Any, global_arrays: Any, data: list[Any], seeds: list[int], plan: Any, group: int
            ) -> dict[int, dict[str, np.ndarray]]:
    """The fleet through iter_train_many; the first CHECKED deltas are kept
    (copied), every other one dropped as it arrives."""
    from edge_agent.batched import iter_train_many

    kept = {}
    for i, outcome in iter_train_many(model, global_arrays, data, plan, seeds, group_size=group):
        if isinstance(outcome, Exception):
            raise outcome
        if i < CHECKED:
            kept[i] = {k: v.copy() for k, v in outcome[0].items()}
    return kept


def one_by_one(model: Any, global_arrays: Any, data: list[Any], seeds: list[int], plan: Any
               ) -> dict[int, dict[str, np.ndarray]]:
    """The worker's path without the wire: load the global model, train_round,
    the delta as federated_arrays minus the global model."""
    from edge_agent.training import train_round
    from fedge.torchkit import federated_arrays, load_federated

    kept = {}
    for i, (d, seed) in enumerate(zip(data, seeds, strict=True)):
        load_federated(model, global_arrays)
        train_round(model, d, plan, seed)
        local = federated_arrays(model)
        delta = {k: (local[k] - global_arrays[k]).astype(np.float32) for k in local}
        if i < CHECKED:
            kept[i] = delta
    return kept


def worst_difference(a: dict[int, dict[str, np.ndarray]], b: dict[int, dict[str, np.ndarray]]) -> float:
    def each() -> Iterator[float]:
        for i, ref in b.items():
            scale = max(float(np.abs(v).max()) for v in ref.values())
            yield max(float(np.abs(a[i][k] - v).max()) for k, v in ref.items()) / scale

    return max(each(), default=0.0)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One run in this (fresh) process: ``spec`` = {devices, mode, group,
    threads}. Memory is the peak above what the process held after building
    the model and the data and warming up."""
    import gc

    import torch

    from fedge.messages import TrainingPlan
    from fedge.torchkit import build_model, federated_arrays

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    n = spec["devices"]
    plan = TrainingPlan(**PLAN)
    model = build_model(MODEL, seed=0)
    global_arrays = federated_arrays(model)
    data, seeds = fleet(n)
    warm = min(8, n)
    if spec["mode"] == "batched":
        def run() -> dict[int, dict[str, np.ndarray]]:
            return batched(model, global_arrays, data, seeds, plan, spec["group"])
        batched(model, global_arrays, data[:warm], seeds[:warm], plan, spec["group"])
    else:
        def run() -> dict[int, dict[str, np.ndarray]]:
            return one_by_one(model, global_arrays, data, seeds, plan)
        one_by_one(model, global_arrays, data[:warm], seeds[:warm], plan)
    gc.collect()
    with PeakRss() as rss:
        cpu, wall = time.process_time(), time.perf_counter()
        kept = run()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    kept_mb = sum(v.nbytes for delta in kept.values() for v in delta.values()) / 2**20
    row: dict[str, Any] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                           "cpu_ms_per_device": round(cpu * 1000 / n, 3),
                           "wall_ms_per_device": round(wall * 1000 / n, 3),
                           "peak_rss_growth_mb": round(rss.growth / 2**20, 1),
                           "kept_deltas_mb": round(kept_mb, 1),
                           "torch_threads": torch.get_num_threads()}
    if spec["mode"] == "batched":
        group = min(spec["group"], n)
        row["group_size"] = group
        row["peak_rss_growth_mb_per_device_of_a_group"] = round((rss.growth / 2**20 - kept_mb) / group, 3)
        # Not timed: the first devices again through train_round, for the difference.
        reference = one_by_one(model, global_arrays, data[:CHECKED], seeds[:CHECKED], plan)
        row["max_delta_difference_relative"] = float(f"{worst_difference(kept, reference):.2e}")
    return row


def in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """``measure`` in a fresh interpreter: no run inherits another's heap (which
    would hide its memory) or warm caches."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"run {spec} failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, action="append", help="fleet size (repeat; default 100, 1000, 10000)")
    ap.add_argument("--group-size", type=int, action="append",
                    help="devices a group (repeat; 0: edge_agent.batched.auto_group_size; default 0 and 256)")
    ap.add_argument("--loop-max", type=int, default=1000, help="train one by one only up to this many devices")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    import torch

    from edge_agent.batched import auto_group_size, bytes_per_device, choose_engine
    from fedge.messages import TrainingPlan
    from fedge.torchkit import build_model

    plan = TrainingPlan(**PLAN)
    model = build_model(MODEL, seed=0)
    engine = choose_engine(model, plan).engine
    auto = auto_group_size(model, plan, engine)
    groups = [g or auto for g in (args.group_size or [0, 256])]
    runs = []
    for n in args.devices or [100, 1000, 10000]:
        row: dict[str, Any] = {"devices": n}
        if n <= args.loop_max:
            row["one_by_one"] = in_child({"devices": n, "mode": "loop", "threads": args.threads})
            note(f"{n} devices one by one: {row['one_by_one']}")
        row["batched"] = []
        for group in groups:
            timing = in_child({"devices": n, "mode": "batched", "group": group, "threads": args.threads})
            if "one_by_one" in row:
                timing["cpu_speedup_vs_one_by_one"] = round(row["one_by_one"]["cpu_s"] / timing["cpu_s"], 2)
                timing["wall_speedup_vs_one_by_one"] = round(row["one_by_one"]["wall_s"] / timing["wall_s"], 2)
            row["batched"].append(timing)
            note(f"{n} devices batched: {timing}")
        runs.append(row)

    emit({
        "benchmark": "batched_training",
        "setup": {"model": f"{MODEL} ({sum(p.numel() for p in model.parameters()):,} parameters)",
                  "examples_per_device": EXAMPLES,
                  "data": "random, MNIST-shaped (784 floats in [0, 1), 10 classes), 60-example slices of a pool "
                          f"of {POOL:,}", "plan": plan.to_json(),
                  "engine": engine, "auto_group_size": auto,
                  "torch_threads": args.threads or torch.get_num_threads(),
                  "runs": "each in a fresh process, after a warm-up of 8 devices",
                  "cpu": "time.process_time of the process (every torch thread); wall: time.perf_counter",
                  "estimated_bytes_per_device": bytes_per_device(model, plan, EXAMPLES, 784 * 4 + 8)},
        "machine": machine(),
        "runs": runs,
    }, args.out)


if __name__ == "__main__":
    main()
