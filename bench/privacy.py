"""Differential privacy: accuracy against epsilon, and what it costs per round.

Client-level DP means something only with many devices: one device's whole
data must hide among the others'. MNIST is split IID over ``--devices``
simulated devices (1,000 by default: 60 training images each), and every
round each device is in it with probability ``--sampling-rate`` (Poisson
sampling, as the accountant assumes; the run without DP draws the same
expected count uniformly). The job's length is fixed (``--rounds``); for
each target epsilon the noise multiplier is the smallest that keeps those
rounds within it at ``--delta`` (``aggregator.privacy.noise_for_budget``,
dp-accounting's RDP accountant), which is how a deployment picks its noise.

The aggregator's real round core (``aggregator.service.build_core`` from an
``AggregatorConfig`` with ``[privacy]``) runs in process without a broker, as
in ``bench/poisoning.py``: the benchmark plays the shell. Each sampled device
trains the published model with ``edge_agent.training.train_round`` on its
own images, clips and noises its delta with ``fedge.privacy.privatize`` (what
the agent does), encodes it with the round's codec (the job default, int2 +
zlib: composition with compression is part of what is measured) and sends an
``Update``. The global model is evaluated on the 10,000 test images.

Runs: ``no_dp`` (the same job without [privacy]: the server's own adaptive
norm bound and weight cap), then ``central`` at each ``--epsilons`` target;
``--extra`` adds ``distributed`` (each device adds its share; the released
model carries the same noise) and ``adaptive`` (adaptive clipping at the
median) at the middle target.

The defaults are the setup of the DP bar in docs/explanation/architecture.md: the FedAvg paper's
2NN (199,210 parameters), 1,000 devices of 60 images, Poisson q = 0.1,
delta 1e-5; and the best of a sweep at epsilon 8 on it (README): clip 0.1,
E=1, B=10, lr 0.1, plain FedAvg on the server (lr 1), 400 rounds. The noise
on the average is ``z C / m`` per coordinate, and what multiplies it hurts:
server momentum 0.9 (an effective step of 3 or 2) and a larger clip (0.3)
learned less; a smaller one (0.05) learned slower; 400 rounds did better
than 200 (more rounds need more noise per round, but the signal grows
faster than the noise).

Per run: final and best accuracy, the accuracy curve, epsilon (and the
worst device's epsilon when participation is known), noise multiplier,
clip, devices per round, and time: wall seconds per round, the aggregator
core's seconds per round, and the devices' seconds spent clipping and
noising per update.

MNIST is read from ``--mnist`` (default: ``$FEDGE_DATA/mnist.npz``).

    python bench/privacy.py --out bench/results/privacy.json
    python bench/privacy.py --quick          # 200 devices, 20 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import AggregatorConfig
from bench._common import emit, machine, note
from fedge.config import updated


def seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def job_config(args: argparse.Namespace, privacy: dict[str, Any] | None, seed: int) -> AggregatorConfig:
    return updated(
        AggregatorConfig(),
        job={"name": "privacy", "model": "fedge.models:mnist_2nn", "model_args": {"hidden": args.hidden},
             "seed": seed, "rounds": args.rounds, "state_dir": "unused-no-state-is-written"},
        selection={"fraction": args.sampling_rate, "min_clients": 1, "max_clients": args.devices,
                   "deadline_s": 60.0, "settle_s": 0.0},
        training={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
        # The direction filter is off: it assumes plain FedAvg's server step
        # (with server momentum, honest updates rightly pull back after an
        # overshoot, and whole rounds are left out).
        server={"optimizer": "fedavgm" if args.server_momentum else "fedavg",
                "lr": args.adaptive_server_lr if privacy and privacy.get("clip_quantile") else args.server_lr,
                "momentum": args.server_momentum or 0.9, "direction": "off"},
        evaluate={"data": "fedge.datasets:mnist", "args": {"path": args.mnist, "split": "test"}},
        limits={"max_devices": max(args.devices, 1000)},
        codec=codec_for(args, privacy),
        # A private round opens once the whole fleet is online and expects
        # sampling_rate x devices of it, whoever is online (privacy.min_devices).
        privacy={**privacy, "min_devices": args.devices} if privacy else {},
    )


def codec_for(args: argparse.Namespace, privacy: dict[str, Any] | None) -> dict[str, Any]:
    """[codec] of a run: ``--codec`` (a name, with zlib), float32 for distributed noise (the only codec
    under which the sum of the devices' noise shares is exactly Gaussian)."""
    if privacy and privacy.get("mode") == "distributed":
        return {"name": "none", "params": {}}
    return {"name": args.codec, "params": {"lossless": "zlib"}}


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from fedge.torchkit import build_model, load_data

        torch.set_num_threads(1)
        self.data = [load_data("fedge.datasets:mnist", {"path": args.mnist, "client": i, "clients": args.devices,
                                                          "partition": "iid", "seed": 0})
                     for i in range(args.devices)]
        self.test = load_data("fedge.datasets:mnist", {"path": args.mnist, "split": "test"})
        self.model = build_model("fedge.models:mnist_2nn", {"hidden": args.hidden})
        self.eval_model = build_model("fedge.models:mnist_2nn", {"hidden": args.hidden})
        self.privatize_seconds: list[float] = []
        self.declined = 0

    def message(self, ann: Any, client: str, index: int, published: dict[str, np.ndarray], seed: int) -> bytes:
        from edge_agent.training import train_round
        from fedge.codecs import make_codec
        from fedge.messages import Decline, Update
        from fedge.privacy import noise_rng, privatize
        from fedge.torchkit import federated_arrays, load_federated

        load_federated(self.model, published)
        try:
            result = train_round(self.model, self.data[index], ann.training,
                                 seed_of(seed, client, ann.round, "train"))
        except Exception as exc:  # as the agent's worker does: the device declines the round
            self.declined += 1
            return Decline(ann.job, ann.round, client, f"training failed: {exc}").encode()
        local = federated_arrays(self.model)
        delta = {k: (local[k] - published[k]).astype(np.float32) for k in local}
        bit = None
        if ann.dp is not None:
            t = time.perf_counter()
            delta, _, bit = privatize(delta, ann.dp, noise_rng())
            self.privatize_seconds.append(time.perf_counter() - t)
        body = make_codec(ann.codec).encode(delta, np.random.default_rng(seed_of(seed, client, ann.round, "enc")))
        return Update(job=ann.job, round=ann.round, sender=client, update_id=f"{client}-r{ann.round}",
                      num_samples=result.num_samples, codec=ann.codec, base_model=ann.model_digest, body=body,
                      loss=result.loss, clip_bit=bit).encode()

    def accuracy(self, arrays: dict[str, np.ndarray]) -> float:
        from fedge.torchkit import evaluate, load_federated

        load_federated(self.eval_model, arrays)
        return float(evaluate(self.eval_model, self.test, "cross_entropy", 2048)["accuracy"])


def run(name: str, args: argparse.Namespace, fleet: Fleet, privacy: dict[str, Any] | None,
        seed: int) -> dict[str, Any]:
    from aggregator.rounds import ClientStatus, MessageArrived, PublishAnnouncement, RoundFinished, TimerFired
    from aggregator.service import build_core
    from fedge import codecs, wire
    from fedge.messages import RoundAnnouncement

    cfg = job_config(args, privacy, seed)
    cfg.check()
    core = build_core(cfg)
    clients = [f"d{i:04d}" for i in range(args.devices)]
    index = {c: i for i, c in enumerate(clients)}
    state: dict[str, Any] = {"ann": None, "finished": []}
    core_seconds = [0.0]

    def feed(event: Any) -> None:
        t = time.perf_counter()
        actions = core.handle(event) if event is not None else core.start(0.0)
        core_seconds[0] += time.perf_counter() - t
        for a in actions:
            if isinstance(a, PublishAnnouncement):
                state["ann"] = RoundAnnouncement.parse(wire.decode(a.message))
            elif isinstance(a, RoundFinished):
                state["finished"].append(a)

    fleet.privatize_seconds.clear()
    fleet.declined = 0
    started = time.perf_counter()
    feed(None)
    info = {"codecs": codecs.supported()}
    for c in clients:
        feed(ClientStatus(c, True, info, 0.0))
    now = 0.0
    feed(TimerFired(now))
    curve: list[tuple[int, float]] = []
    per_round: list[int] = []
    round_core: list[float] = []
    ema: dict[str, np.ndarray] | None = None
    ema_curve: list[tuple[int, float]] = []
    while len(state["finished"]) < args.rounds:
        ann = state["ann"]
        if ann is None or ann.state != "open":
            break
        done = len(state["finished"])
        core_before = core_seconds[0]
        published = core.models.published
        for client in ann.selected:
            message = fleet.message(ann, client, index[client], published, seed)
            now += 0.001
            feed(MessageArrived(client, message, now))
            feed(TimerFired(now))
        if len(state["finished"]) == done:  # nobody sampled, or a quorum never reached: the deadline
            now += ann.deadline_s
            feed(TimerFired(now))
        if len(state["finished"]) == done:
            raise SystemExit(f"{name}: round {ann.round} still open after its deadline")
        round_core.append(core_seconds[0] - core_before)
        fin = state["finished"][-1]
        if args.ema:  # post-processing of released models: costs no privacy
            ema = ({k: v.astype(np.float64) for k, v in fin.model.items()} if ema is None else
                   {k: args.ema * ema[k] + (1 - args.ema) * fin.model[k] for k in ema})
        per_round.append(fin.record.clients)
        r = fin.record.round
        if r % args.eval_every == 0 or r == args.rounds or fin.last:
            curve.append((r, round(fleet.accuracy(fin.model), 4)))
            if ema is not None:
                ema_curve.append((r, round(fleet.accuracy({k: v.astype(np.float32) for k, v in ema.items()}), 4)))
        if fin.last:
            break
    wall = time.perf_counter() - started
    rec = state["finished"][-1].record
    extra = rec.extra
    accs = [a for _, a in curve]
    return {
        "run": name, "seed": seed, "rounds": len(per_round),
        "final_accuracy": accs[-1], "best_accuracy": max(accs),
        "epsilon": extra.get("epsilon"), "epsilon_participant": extra.get("epsilon_participant"),
        "epsilon_aggregator": extra.get("epsilon_aggregator"), "delta": extra.get("delta"),
        "noise_multiplier": extra.get("noise_multiplier"), "sampling_rate": extra.get("sampling_rate"),
        "noise": extra.get("dp_noise"), "clip_last_round": extra.get("dp_clip"),
        "devices_per_round_mean": round(statistics.fmean(per_round), 2),
        "devices_per_round_min": min(per_round), "devices_per_round_max": max(per_round),
        "declined_training_failed": fleet.declined,
        "rounds_failed": sum(1 for f in state["finished"] if f.record.status != "ok"),
        "wall_seconds": round(wall, 2),
        "wall_seconds_per_round": round(wall / max(1, len(per_round)), 4),
        "aggregator_core_seconds_per_round_median": round(statistics.median(round_core), 5),
        "device_privatize_seconds_per_update_median": (round(statistics.median(fleet.privatize_seconds), 6)
                                                       if fleet.privatize_seconds else None),
        "accuracy_curve": curve,
        **({"ema_decay": args.ema, "final_accuracy_ema": ema_curve[-1][1], "accuracy_curve_ema": ema_curve}
           if ema_curve else {}),
    }


_FLEET: list[Fleet] = []


def _task(args: argparse.Namespace, task: tuple[str, dict[str, Any] | None, int]) -> dict[str, Any]:
    from aggregator.privacy import epsilon, gaussian_epsilon

    logging.getLogger("fedge").setLevel(logging.ERROR)
    if not _FLEET:
        _FLEET.append(Fleet(args))
    name, privacy, seed = task
    # Each run pays for its own accounting: no epsilon cached by an earlier run.
    epsilon.cache_clear()
    gaussian_epsilon.cache_clear()
    r = run(name, args, _FLEET[0], privacy, seed)
    note(f"{name} seed {seed}: accuracy {r['final_accuracy']} epsilon {r['epsilon']} "
          f"({r['wall_seconds_per_round']} s/round)")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--sampling-rate", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epsilons", default="8,3,1")
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=200,
                   help="the 2NN's hidden width (32: 26,506 parameters; 200: the FedAvg paper's 199,210)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--adaptive-server-lr", type=float, default=0.1,
                   help="server lr of the adaptive-clipping runs: the clip follows the update norms, so the step "
                        "C x lr needs a smaller lr than a fixed small clip")
    p.add_argument("--server-momentum", type=float, default=0.0, help="0: plain FedAvg on the server")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--ema", type=float, default=0.0,
                   help="also evaluate an exponential moving average of the released models (this decay)")
    p.add_argument("--seeds", default="0", help="each run once per seed (training and sampling)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    p.add_argument("--extra", action="store_true", help="also distributed noise and adaptive clipping")
    p.add_argument("--quick", action="store_true", help="200 devices, 20 rounds")
    p.add_argument("--only", default="", help="run only these (comma-separated run names, e.g. adaptive_eps3)")
    p.add_argument("--clip-quantile", type=float, default=0.5, help="the adaptive run's target quantile")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, one process each (times per round then share the cores)")
    p.add_argument("--codec", default="int8", help="uplink codec of the runs (with zlib); distributed: none")
    p.add_argument("--mnist", default=os.path.join(os.environ["FEDGE_DATA"], "mnist.npz")
                   if os.environ.get("FEDGE_DATA") else None,
                   help="the MNIST .npz (default: $FEDGE_DATA/mnist.npz)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.quick:
        args.devices, args.rounds, args.eval_every = 200, 20, 5
    if not args.mnist or not os.path.isfile(args.mnist):
        found = f" ({args.mnist} not found)" if args.mnist else ""
        raise SystemExit(f"bench/privacy.py needs MNIST{found}: pass --mnist PATH or set FEDGE_DATA to the "
                         "directory that holds mnist.npz")
    delta = args.delta
    seeds = [int(x) for x in args.seeds.split(",") if x]
    logging.getLogger("fedge").setLevel(logging.ERROR)
    from aggregator.privacy import noise_for_budget

    targets = [float(e) for e in args.epsilons.split(",") if e]
    runs: list[tuple[str, dict[str, Any] | None]] = [] if args.no_baseline else [("no_dp", None)]
    base = {"clip": args.clip, "sampling_rate": args.sampling_rate, "delta": delta, "accountant": "rdp"}
    for eps in targets:
        z = noise_for_budget(eps, args.rounds, args.sampling_rate, delta)
        runs.append((f"central_eps{eps:g}", {**base, "mode": "central", "noise_multiplier": z,
                                             "target_epsilon": eps}))
    if args.extra and targets:
        for eps in targets:
            z = noise_for_budget(eps, args.rounds, args.sampling_rate, delta)
            runs.append((f"distributed_eps{eps:g}", {**base, "mode": "distributed", "noise_multiplier": z,
                                                     "target_epsilon": eps}))
            runs.append((f"adaptive_eps{eps:g}", {**base, "mode": "central", "noise_multiplier": z,
                                                  "target_epsilon": eps, "clip_quantile": args.clip_quantile,
                                                  "clip_bit_noise": args.devices * args.sampling_rate / 20}))
    if args.only:
        keep = set(args.only.split(","))
        runs = [(n, pr) for n, pr in runs if n in keep]
        if not runs:
            raise SystemExit(f"--only {args.only} names no run")
    tasks = [(name, privacy, seed) for seed in seeds for name, privacy in runs]
    results: list[dict[str, Any]] = []
    if args.jobs <= 1:
        results = [_task(args, t) for t in tasks]
    else:  # one fleet per worker process; each run is still one process's work, timed alone
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_task, [args] * len(tasks), tasks))
    summary = []
    for name, _ in runs:
        mine = [r for r in results if r["run"] == name]
        finals = [r["final_accuracy"] for r in mine]
        row: dict[str, Any] = {
            "run": name, "seeds": len(mine), "final_accuracy_mean": round(statistics.fmean(finals), 4),
            "final_accuracy_min": min(finals), "final_accuracy_max": max(finals),
            **{k: mine[0][k] for k in ("epsilon", "epsilon_participant", "epsilon_aggregator", "delta",
                                       "noise_multiplier", "sampling_rate", "noise")},
            "devices_per_round_mean": round(statistics.fmean(r["devices_per_round_mean"] for r in mine), 2),
            "wall_seconds_per_round": round(statistics.fmean(r["wall_seconds_per_round"] for r in mine), 4),
            "aggregator_core_seconds_per_round_median": round(statistics.fmean(
                r["aggregator_core_seconds_per_round_median"] for r in mine), 5),
            "device_privatize_seconds_per_update_median": mine[0]["device_privatize_seconds_per_update_median"],
        }
        summary.append(row)
    if summary and summary[0]["run"] == "no_dp":
        base = summary[0]
        for row in summary[1:]:
            row["accuracy_drop_points"] = round(100 * (base["final_accuracy_mean"] - row["final_accuracy_mean"]), 2)
            row["aggregator_core_per_round_vs_no_dp"] = round(
                row["aggregator_core_seconds_per_round_median"] / base["aggregator_core_seconds_per_round_median"], 2)
    emit({
        "benchmark": "privacy",
        "machine": machine(),
        "task": (f"MNIST 2NN (hidden {args.hidden}), IID over {args.devices} devices "
                 f"({60000 // args.devices} training images each), E={args.epochs}, B={args.batch_size}, "
                 f"lr {args.lr}; server lr {args.server_lr} (adaptive clipping: {args.adaptive_server_lr}), "
                 f"momentum {args.server_momentum} (direction filter off); "
                 f"uplink {args.codec} + zlib (distributed: float32); "
                 f"{args.rounds} rounds; the 10,000 test images"),
        "privacy": {"sampling": "Poisson", "sampling_rate": args.sampling_rate, "delta": delta,
                    "clip": args.clip, "accountant": "rdp (dp-accounting)",
                    "noise": "noise_multiplier: the smallest that keeps the rounds within each target"},
        "seeds": seeds,
        "jobs": args.jobs,
        "summary": summary,
        "results": results,
    }, args.out)


if __name__ == "__main__":
    main()
