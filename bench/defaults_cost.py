"""What fedge's defaults cost on non-IID data, in rounds to a target accuracy.

A round is what a slow link pays for: a default that saves bytes but costs
rounds may cost the fleet more than it saves. This runs the same job, on
the same non-IID split with the same training plan, under plain float32
FedAvg (no codec, a full model each round, no defences) and under the
shipped defaults, then under the defaults with one thing changed at a time,
so that each default's cost in rounds shows on its own:

* ``plain``: float32 updates and downlink, no norm bound, weight cap or
  direction filter: plain FedAvg (McMahan et al. 2017);
* ``defaults``: as shipped (int2 + zlib updates with error feedback, int4
  deltas down, the adaptive norm bound, the weight cap, the direction filter);
* ``no_direction``, ``no_bound``, ``no_cap``, ``no_bound_cap``: the defaults
  without that defence; ``bound_x1.5``, ``bound_x2``: the norm bound at 1.5
  or 2 times the median norm instead of the default's;
* ``int8_up``, ``int8_down``, ``float32_down``: the defaults with another codec.

The aggregator's real round core runs in process (``bench/poisoning.py``'s
shell and devices: every device really trains the published model and
encodes its update with the announced codec). Rounds to the target are the
first round whose global model reaches it, on the held-out test split.

Tasks:
* ``digits``: the demo's split (scikit-learn digits, Dirichlet alpha 0.5
  over 10 devices), the digits MLP (64-128-10), E=1, B=16, lr 0.05, to 85%;
* ``mnist_shards``: MNIST's pathological non-IID split (McMahan et al.:
  sorted by label, two shards per device) over 10 devices keeping 1,000
  examples each, the 2NN, E=1, B=10, lr 0.1, to 85% (plain FedAvg reaches
  about 87% in the 100 rounds). MNIST is ``$FEDGE_DATA/mnist.npz``.

Bar (issue 26): with the defaults, rounds to the target within 15% of plain
float32 FedAvg on the same plan.

    python bench/defaults_cost.py --out bench/results/defaults_cost.json
    python bench/defaults_cost.py --tasks digits --configs plain,defaults --seeds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from poisoning import Task, _worker_init, run_one

from bench._common import emit, machine, note

BAR = 1.15  # rounds to the target under the defaults, at most this times plain FedAvg's

TASKS: dict[str, tuple[Task, float]] = {
    "digits": (Task(
        model="fedge.models:digits_mlp", data="fedge.datasets:digits", data_args={}, test_args={"split": "test"},
        rounds=60, training={"epochs": 1, "batch_size": 16, "lr": 0.05},
        note="scikit-learn digits, the demo's split (Dirichlet alpha 0.5 over 10 devices, seed 0), the digits "
             "MLP 64-128-10, E=1, B=16, lr 0.05; 450 test images",
    ), 0.85),
    "mnist_shards": (Task(
        model="fedge.models:mnist_2nn", data="fedge.datasets:mnist",
        # No path: fedge.datasets.mnist reads $FEDGE_DATA/mnist.npz (checked in main).
        data_args={"partition": "shards", "shards_per_client": 2, "limit": 1000},
        test_args={"split": "test"},
        rounds=100, training={"epochs": 1, "batch_size": 10, "lr": 0.1},
        note="MNIST, pathological non-IID (sorted by label, 2 shards per device) over 10 devices keeping 1,000 "
             "examples each, the 2NN (199,210 parameters), E=1, B=10, lr 0.1; the 10,000-image test set",
    ), 0.85),
}

PLAIN_SERVER = {"clip": "off", "weight_cap": 0.0, "direction": "off"}
FLOAT32 = {"name": "none", "params": {}}
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "plain": (PLAIN_SERVER, {"codec": FLOAT32, "downlink": {"codec": {"name": "none"}}}),
    "defaults": ({}, {}),
    "no_direction": ({"direction": "off"}, {}),
    "no_bound_cap": ({"clip": "off", "weight_cap": 0.0}, {}),
    "no_bound": ({"clip": "off"}, {}),
    "no_cap": ({"weight_cap": 0.0}, {}),
    "bound_x1.25": ({"clip_multiplier": 1.25}, {}),
    "bound_x1.5": ({"clip_multiplier": 1.5}, {}),
    "bound_x2": ({"clip_multiplier": 2.0}, {}),
    "int8_up": ({}, {"codec": {"name": "int8", "params": {"lossless": "zlib"}}}),
    "int8_down": ({}, {"downlink": {"codec": {"name": "int8", "block": 64, "lossless": "zlib"}}}),
    "float32_down": ({}, {"downlink": {"codec": {"name": "none"}}}),
}


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def one(task_name: str, config: str, seed: int) -> dict[str, Any]:
    task, target = TASKS[task_name]
    server, sections = CONFIGS[config]
    r = run_one(task_name, task, config, server, "clean", task.rounds, seed, sections)
    curve = r["accuracy_curve"]
    return {"task": task_name, "config": config, "seed": seed, "target": target,
            "rounds_to_target": rounds_to(curve, target), "rounds_run": r["rounds_run"],
            "final_accuracy": r["final_accuracy"], "best_accuracy": r["best_accuracy"],
            "rounds_failed": r["rounds_failed"], "left_out": r["left_out"]["honest"],
            "clipped": r["clipped"], "weight_capped": r["weight_capped"], "crashes": len(r["crashes"]),
            "accuracy_curve": curve, "wall_seconds": r["wall_seconds"]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        by: dict[str, Any] = {}
        for config in CONFIGS:
            mine = [r for r in runs if r["task"] == task and r["config"] == config]
            if not mine:
                continue
            reached = [r["rounds_to_target"] for r in mine]
            by[config] = {"rounds_to_target": reached,
                          "mean": statistics.fmean(reached) if None not in reached else None,
                          "final_accuracy_mean": round(statistics.fmean(r["final_accuracy"] for r in mine), 4)}
        plain, defaults = by.get("plain", {}).get("mean"), by.get("defaults", {}).get("mean")
        verdict = None
        if plain and defaults:
            verdict = {"defaults_over_plain": round(defaults / plain, 3), "meets": defaults <= BAR * plain}
        out[task] = {"target": TASKS[task][1], "configs": by, "bar": verdict}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per (task, config); mnist_shards runs one")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    configs = [c for c in args.configs.split(",") if c]
    for name, known in ((tasks, TASKS), (configs, CONFIGS)):
        unknown = [x for x in name if x not in known]
        if unknown:
            raise SystemExit(f"unknown {', '.join(unknown)}; use {', '.join(known)}")
    data = os.environ.get("FEDGE_DATA")
    if "mnist_shards" in tasks and not (data and os.path.isfile(os.path.join(data, "mnist.npz"))):
        found = f" ({os.path.join(data, 'mnist.npz')} not found)" if data else ""
        raise SystemExit(f"bench/defaults_cost.py needs MNIST for mnist_shards{found}: set FEDGE_DATA to the "
                         "directory that holds mnist.npz (or --tasks digits)")
    jobs = [(t, c, s) for t in tasks for c in configs for s in range(args.seeds if t == "digits" else 1)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_worker_init) as pool:
        runs = list(pool.map(one, *zip(*jobs, strict=True)))
    for r in runs:
        note(f"{r['task']:13s} {r['config']:13s} seed {r['seed']}: {r['rounds_to_target']} rounds to "
             f"{r['target']:.0%}, final {r['final_accuracy']}")
    emit({"benchmark": "defaults_cost", "machine": machine(), "bar": f"defaults within {BAR - 1:.0%} of plain "
          "float32 FedAvg's rounds to the target",
          "setup": {t: TASKS[t][0].note for t in tasks}, "summary": summarize(runs), "runs": runs,
          "wall_seconds": round(time.perf_counter() - started, 1)}, args.out)


if __name__ == "__main__":
    main()
