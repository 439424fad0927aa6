"""Seconds per round of the demo workload over a real broker.

The `fedge demo` workload, unchanged: 10 agents with their own MQTT
connections, each training its Dirichlet(0.5) share of scikit-learn digits,
an aggregator folding updates in the job's default codec (int2 + zlib;
`--codec` picks another), and a held-out evaluation per round.
Round time is measured by the aggregator from announcement to close.

Bar (docs/explanation/architecture.md): median < 1 s per round for 10 agents on 2 cores.

    python bench/round_latency.py [--broker mosquitto|embedded|mqtt://...] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import AggregatorConfig
from bench._common import PrivateMosquitto, emit, machine, progress
from fedge.codecs import parse_spec
from fedge_cli.demo import DemoOptions, run_demo


class _Rows(io.StringIO):
    """The demo's table, kept in memory; each round row advances ``bar``."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar = bar

    def write(self, text: str) -> int:
        if text[:5].strip().isdigit():
            self.bar.advance()
        return super().write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default="mosquitto", help="mosquitto (a private one), embedded, or a URL")
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--codec", default=None, type=parse_spec,
                    help="update codec, a name or JSON (default: the job default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    mosq = None
    if args.broker == "mosquitto":
        mosq = PrivateMosquitto()
        url = mosq.url
    elif args.broker == "embedded":
        url = None
    else:
        url = args.broker
    codec = args.codec or AggregatorConfig().codec.spec
    started = time.perf_counter()
    try:
        with progress("demo rounds", args.rounds, unit="rounds") as bar:
            summary = run_demo(DemoOptions(agents=args.agents, rounds=args.rounds, broker=url, codec=codec),
                               out=_Rows(bar))
    finally:
        if mosq:
            mosq.close()
    rounds = summary["rounds"]
    steady = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    q = statistics.quantiles(steady, n=10) if len(steady) > 1 else steady * 9
    median = statistics.median(steady)
    emit({
        "benchmark": "round_latency",
        "workload": {"agents": args.agents, "rounds": args.rounds, "data": "sklearn digits, Dirichlet alpha=0.5",
                     "model": "fedge.models:digits_mlp", "codec": codec,
                     "downlink": AggregatorConfig().downlink.codec,
                     "broker": args.broker if args.broker in ("mosquitto", "embedded") else "external"},
        "machine": machine(),
        "seconds_per_round": {"median": round(median, 4), "p90": round(q[8], 4), "max": round(max(steady), 4),
                              "first_round": rounds[0]["seconds"], "note": "median/p90/max exclude round 1 "
                              "(training workers warming up)"},
        # As the agents measured them: MQTT payloads all agents sent (up) and received (down), every
        # agent's copy of the model included (the aggregator's own count is the rounds' bytes_up/bytes_down).
        "bytes_per_round": {"up": int(statistics.median(r["agents_bytes_sent"] for r in rounds)),
                            "down": int(statistics.median(r["agents_bytes_received"] for r in rounds)),
                            "counted_by": "agents"},
        "final_accuracy": summary["final_accuracy"],
        "wall_seconds": round(time.perf_counter() - started, 2),
        "bar": {"median_round_seconds_lt": 1.0, "pass": median < 1.0},
    }, args.out)


if __name__ == "__main__":
    main()
