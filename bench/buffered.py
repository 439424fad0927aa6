"""Synchronous rounds against buffered asynchronous aggregation (FedBuff) on
the same simulated fleet: seconds to a target accuracy, final accuracy and
uplink bytes.

Each run is ``bench/fleet.py`` (a private Mosquitto, ``fedge aggregator``,
``fedge simulate`` with the fleet profile, every device enrolled and
signing): MNIST 2NN, IID, 100 devices of 600 examples, E = 1, B = 10, int2
updates. Both modes keep the same number of devices training at once:

* ``sync``: rounds of ``--fraction`` x devices (10), quorum 1;
* ``buffered``: ``concurrency`` = the same 10, a version every
  ``--buffer-size`` updates, polynomial staleness weights (a = 0.5),
  ``max_staleness`` 10.

Both fold the same number of updates (sync ``--rounds`` rounds of 10,
buffered 10 x rounds / buffer-size versions), so the final accuracies are
of the same uplink budget.

Time scale: 3, not the 10 of ``bench/fleet.py``'s time-to-accuracy runs.
The simulator's own work for a task (gathering a training batch, the
training worker, the broker, the aggregator's turn) takes wall time, which
the time scale multiplies into fleet time: at 10 it added about 7 fleet
seconds to every round and task, the same for every device, and hid the
differences between devices that asynchrony is about (one seed on
cellular-mixed: 1.28x at 10, 3.1x at 3). Per seed and mode the JSON has the fleet
seconds (wall x time scale) and versions to the target, the uplink bytes
the aggregator received until then, the final accuracy and what the run
did (updates per version, staleness, refusals); per mode, the medians over
the seeds; and the speed-up (sync seconds over buffered seconds).

    python bench/buffered.py --preset cellular-mixed --out bench/results/buffered_cellular.json
    python bench/buffered.py --preset lab --out bench/results/buffered_lab.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fleet
from bench._common import emit, machine, note


def one(mode: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    per_round = round(args.devices * args.fraction)
    versions = args.rounds if mode == "synchronous" else args.rounds * per_round // args.buffer_size
    argv = ["--devices", str(args.devices), "--rounds", str(versions), "--preset", args.preset,
            "--fraction", str(args.fraction), "--target", str(args.target), "--time-scale", str(args.time_scale),
            "--mode", mode, "--buffer-size", str(args.buffer_size), "--concurrency", str(per_round),
            "--max-staleness", str(args.max_staleness), "--staleness", args.staleness, "--seed", str(seed),
            "--timeout", str(args.timeout)]
    if args.data:
        argv += ["--data", args.data]
    fa = fleet.parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-buffered-") as tmp:
        r = fleet.run(fa, Path(tmp))
    rounds = r["rounds"]
    reached = r["reached_target"]
    upto = [x for x in rounds if reached is None or x["round"] <= reached["round"]]
    staleness: Counter[str] = Counter()
    for x in rounds:
        staleness.update((x.get("buffered") or {}).get("staleness", {}))
    refused: Counter[str] = Counter()
    for x in rounds:
        refused.update(x["refused"])
    folded = [x["folded"] for x in rounds]
    out = {
        "seed": seed,
        "versions_run": len(rounds),
        "versions_ok": r["rounds_ok"],
        "timed_out": r["timed_out"],
        "seconds_to_target": None if reached is None else reached["fleet_s"],
        "wall_s_to_target": None if reached is None else reached["wall_s"],
        "versions_to_target": None if reached is None else reached["round"],
        "uplink_bytes_to_target": sum(x["bytes_up"] or 0 for x in upto) if reached else None,
        "updates_folded_to_target": sum(x["folded"] for x in upto) if reached else None,
        "final_accuracy": r["final_accuracy"],
        "best_accuracy": r["best_accuracy"],
        "updates_folded": sum(folded),
        "updates_per_version": {"min": min(folded, default=0), "max": max(folded, default=0)},
        "refused": dict(refused),
        "uplink_bytes_per_update": r["uplink_bytes_per_update"],
        "wall_s": r["wall_s"],
        "simulator_updates_sent": (r["simulator"] or {}).get("updates_sent"),
    }
    if staleness:
        out["staleness"] = dict(sorted(staleness.items(), key=lambda kv: int(kv[0])))
    note(f"{args.preset} {mode} seed {seed}: {out['seconds_to_target']} fleet s to {args.target}, "
         f"final {out['final_accuracy']}")
    return out


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if len(values) == len(runs) else None  # a run that missed: no median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="fleet profile: lab, home-wifi, cellular-mixed or a TOML file")
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1, help="sync: devices a round; buffered: its concurrency")
    p.add_argument("--rounds", type=int, default=60, help="sync rounds; buffered runs as many updates")
    p.add_argument("--buffer-size", type=int, default=5)
    p.add_argument("--max-staleness", type=int, default=10)
    p.add_argument("--staleness", default="polynomial")
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--time-scale", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=900.0, help="wall seconds a run may take")
    p.add_argument("--data", default=None, help="mnist.npz (default: $FEDGE_DATA/mnist.npz)")
    args = p.parse_args()
    if not args.data and not os.environ.get("FEDGE_DATA"):
        raise SystemExit("MNIST: pass --data PATH or set FEDGE_DATA to the directory holding mnist.npz")
    result: dict[str, Any] = {}
    for name, mode in (("sync", "synchronous"), ("buffered", "buffered")):
        runs = [one(mode, args, seed) for seed in range(args.seeds)]
        result[name] = {
            "seconds_to_target": median(runs, "seconds_to_target"),
            "final_accuracy": median(runs, "final_accuracy"),
            "uplink_bytes_to_target": median(runs, "uplink_bytes_to_target"),
            "versions_to_target": median(runs, "versions_to_target"),
            "runs": runs,
        }
    s, b = result["sync"], result["buffered"]
    speedup = (s["seconds_to_target"] / b["seconds_to_target"]
               if s["seconds_to_target"] and b["seconds_to_target"] else None)
    per_round = round(args.devices * args.fraction)
    emit({"benchmark": "buffered", "machine": machine(),
          "setup": {"preset": args.preset, "devices": args.devices, "training_at_once": per_round,
                    "sync": {"devices_per_round": per_round, "quorum": 1.0, "rounds": args.rounds},
                    "buffered": {"concurrency": per_round, "buffer_size": args.buffer_size,
                                 "versions": args.rounds * per_round // args.buffer_size,
                                 "staleness": args.staleness, "max_staleness": args.max_staleness},
                    "model": "fedge.models:mnist_2nn", "split": "iid", "E": 1, "B": 10, "lr": 0.2,
                    "codec": "int2 + zlib", "target": args.target, "time_scale": args.time_scale,
                    "seeds": args.seeds, "seconds": "fleet seconds: wall x time scale"},
          **result,
          "speedup": None if speedup is None else round(speedup, 2),
          "uplink_ratio": (round(b["uplink_bytes_to_target"] / s["uplink_bytes_to_target"], 3)
                           if s["uplink_bytes_to_target"] and b["uplink_bytes_to_target"] else None),
          "final_accuracy_gap_points": (round(100 * (b["final_accuracy"] - s["final_accuracy"]), 2)
                                        if s["final_accuracy"] and b["final_accuracy"] else None)}, args.out)


if __name__ == "__main__":
    main()
