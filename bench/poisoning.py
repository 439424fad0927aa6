"""Poisoning: what hostile devices among ten do to the model, per defence.

The aggregator's real round core (``aggregator.rounds.RoundCore``, built by
``aggregator.service.build_core`` from an ``AggregatorConfig``) runs in
process, without a broker: the benchmark plays the shell, feeding
``ClientStatus`` for ten devices, then each round one ``MessageArrived`` per
selected device and ``TimerFired`` ticks, and collecting ``RoundFinished``.
Each device does what an agent and its training worker do: it trains the
*published* model (``core.models.published``: key plus downlink delta, not
the exact server model) with ``edge_agent.training.train_round`` on its
own share of the data, encodes ``local - global`` with the codec the round
announced (the job default, int2 + zlib) and sends an ``Update`` naming the
announced model digest. The global model (``RoundFinished.model``, the exact
one) is evaluated on the held-out test split after every round, as the
aggregator's service does.

Attacks (the attackers are the last clients: c09, or c07-c09):

* ``clean``: no attacker.
* ``weight_1e6``: an honest delta claiming 10**6 samples.
* ``scale_x100`` / ``sign_flip``: the honest delta x 100 / x -1.
* ``weight_scale``: 10**6 samples and the delta x 10 (the fault campaign's case).
* ``label_flip_10`` / ``label_flip_30``: 1 / 3 of the ten train on y -> 9 - y.
* ``absent``: the last device declines every round, which is what a
  perfect defence would make of any attacker there: the model never sees
  its data. Its drop is the floor for every other attack's.
* ``nan`` / ``inf``: a body in the announced codec whose scales are NaN / Inf
  (crafted bytes: the honest encoder refuses non-finite deltas).

Defences are sets of ``[server]`` keys (``DEFENCES``): ``none`` (plain
FedAvg), ``defaults`` (as shipped), ``median``, ``trimmed_mean``, ``krum``;
``--defence NAME:JSON`` adds others (e.g. another ``clip_multiplier``).

Per (task, defence, attack): final and best accuracy, accuracy drop against
the same defence's clean run and against plain FedAvg's clean run, rounds
failed, updates rejected by reason, what the defences did (clipped,
capped, left out), rounds closed by the deadline instead of the quorum,
crashes (an exception escaping the core: caught, recorded, the benchmark goes
on) and stalls (a round still open after its deadline), and wall time.

Bar: with the defaults, one attacker among ten costs at most 1 point of final
accuracy, and no attack crashes or stalls anything. One digits run's final
accuracy varies by about that point from seed to seed (450 test images), so
``--noise-seeds`` extra seeds run the defaults' clean run of every task and,
for digits, every attack: the verdict takes the mean of the paired drops
(clean minus attacked, same seed) where there are several.

    python bench/poisoning.py --out bench/results/poisoning.json
    python bench/poisoning.py --quick                     # digits, 10 rounds: a smoke run
    python bench/poisoning.py --tasks digits --defences defaults,none --attacks clean,weight_scale
    python bench/poisoning.py --tasks digits --defence 'mult1:{"clip_multiplier": 1.0}'
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import AggregatorConfig
from bench._common import REPO, emit, machine, note
from fedge.config import updated

# MNIST: the loader reads $FEDGE_DATA/mnist.npz (fedge ships no copy).
MNIST = Path(os.environ["FEDGE_DATA"]) / "mnist.npz" if os.environ.get("FEDGE_DATA") else None
CLIENTS = 10
BAR_POINTS = 1.0
MNIST_PER_CLIENT = 1000  # of the 6,000 of an IID tenth: keeps the whole benchmark under 20 minutes on 2 cores


@dataclass(frozen=True)
class Task:
    model: str
    data: str
    data_args: dict[str, Any]  # per device, besides client/clients/seed
    test_args: dict[str, Any]
    rounds: int
    training: dict[str, Any]  # [training] keys
    note: str
    # The extra seeds run every attack under the defaults, not only the clean
    # run: where one run's final accuracy varies by about the bar's point,
    # the verdict needs the mean of paired drops.
    seed_every_attack: bool = False


TASKS: dict[str, Task] = {
    "digits": Task(
        model="fedge.models:digits_mlp", data="fedge.datasets:digits", data_args={}, test_args={"split": "test"},
        rounds=30, training={"epochs": 2, "batch_size": 16, "lr": 0.1},
        note="scikit-learn digits, the loader's default partition (Dirichlet alpha 0.5 over labels, seed 0), "
             "450 test images; the demo's plan (E=2, B=16, lr 0.1) and length (30 rounds)",
        seed_every_attack=True,
    ),
    "mnist_2nn": Task(
        model="fedge.models:mnist_2nn", data="fedge.datasets:mnist",
        data_args={"partition": "iid", "limit": MNIST_PER_CLIENT},
        test_args={"split": "test"},
        rounds=20, training={"epochs": 1, "batch_size": 10, "lr": 0.1},
        note=f"MNIST 2NN (199,210 parameters), IID over 10 clients, each keeping the first {MNIST_PER_CLIENT:,} "
             f"examples of its share ({CLIENTS * MNIST_PER_CLIENT:,} of 60,000: the whole matrix fits in under 20 "
             "minutes on 2 cores), E=1, B=10, lr 0.1, 20 rounds; the full 10,000-image test set",
    ),
}

# [server] keys of each defence; every one also gets selection.max_clients = 10
# (the robust rules need the bound to pass the config check).
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {"aggregation": "mean", "clip": "off", "weight_cap": 0.0},
    "defaults": {},
    "median": {"aggregation": "median"},
    "trimmed_mean": {"aggregation": "trimmed_mean"},
    "krum": {"aggregation": "krum"},
}


@dataclass(frozen=True)
class Attack:
    description: str
    attackers: int = 1  # the last ones of the ten
    samples: int | None = None  # the num_samples claimed; None: the true count
    scale: float = 1.0  # applied to the trained delta
    flip_labels: bool = False
    payload: float | None = None  # a non-finite value crafted into the body's scales
    absent: bool = False  # declines every round: what a perfect defence would make of any attacker


ATTACKS: dict[str, Attack] = {
    "clean": Attack("no attacker", attackers=0),
    "weight_1e6": Attack("an honest delta claiming num_samples = 10**6", samples=10**6),
    "scale_x100": Attack("the honest delta x 100", scale=100.0),
    "sign_flip": Attack("the honest delta x -1", scale=-1.0),
    "absent": Attack("the attacker's device declines every round: a perfect defence's result, the floor of "
                     "what any defence can do without the attacker's data", absent=True),
    "weight_scale": Attack("num_samples = 10**6 and the delta x 10 (the fault campaign's case)",
                           samples=10**6, scale=10.0),
    "label_flip_10": Attack("1 of 10 clients trains on labels y -> 9 - y", flip_labels=True),
    "label_flip_30": Attack("3 of 10 clients train on labels y -> 9 - y", attackers=3, flip_labels=True),
    "nan": Attack("a body in the announced codec (int2 + zlib) whose scales are NaN", payload=math.nan),
    "inf": Attack("a body in the announced codec (int2 + zlib) whose scales are +Inf", payload=math.inf),
}


def job_config(task: Task, server: dict[str, Any], rounds: int, seed: int,
               sections: dict[str, dict[str, Any]] | None = None) -> AggregatorConfig:
    """``sections``: other config sections to set (codec, downlink: see bench/defaults_cost.py)."""
    cfg = updated(
        AggregatorConfig(),
        job={"name": "poisoning", "model": task.model, "seed": seed, "rounds": rounds,
             "state_dir": "unused-no-state-is-written"},
        selection={"fraction": 1.0, "min_clients": CLIENTS, "max_clients": CLIENTS},
        training=dict(task.training),
        evaluate={"data": task.data, "args": dict(task.test_args)},
        server=dict(server),
    )
    return updated(cfg, **sections) if sections else cfg


def device_seed(seed: int, client: str, round_: int, purpose: str) -> int:
    """As the agent seeds training and encoding (``edge_agent.core``), with
    the benchmark's seed in front so that other seeds draw other noise."""
    text = f"{seed}/{client}/{round_}/{purpose}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# --- the devices -----------------------------------------------------------------


class Fleet:
    """Ten devices of one task in this process: their data, one PyTorch model
    to train with (as a warm worker shares one across devices) and one to
    evaluate with."""

    def __init__(self, task: Task, seed: int) -> None:
        import torch

        from fedge.torchkit import build_model, load_data

        self.task = task
        self.seed = seed
        self.data = [load_data(task.data, {**task.data_args, "client": i, "clients": CLIENTS, "seed": 0})
                     for i in range(CLIENTS)]
        self.flipped = [(x, (9 - y).to(torch.int64)) for x, y in self.data]  # type: ignore[misc]
        self.model = build_model(task.model)
        self.eval_model = build_model(task.model)
        self.test = load_data(task.data, task.test_args)

    def samples(self, index: int) -> int:
        return len(self.data[index][0])

    def message(self, ann: Any, client: str, index: int, published: dict[str, np.ndarray], attack: Attack,
                hostile: bool, residuals: dict[str, dict[str, np.ndarray]]) -> bytes:
        """What device ``index`` sends for the announced round: an update (or
        a decline when its training fails, as the agent's worker reports)."""
        from edge_agent.training import train_round
        from fedge.codecs import error_feedback, make_codec
        from fedge.messages import Decline, Update
        from fedge.tensors import TensorSpec
        from fedge.torchkit import federated_arrays, load_federated

        if hostile and attack.absent:
            return Decline(ann.job, ann.round, client, "absent: takes no part").encode()
        data = self.flipped[index] if hostile and attack.flip_labels else self.data[index]
        try:
            load_federated(self.model, published)
            result = train_round(self.model, data, ann.training, device_seed(self.seed, client, ann.round, "train"))
        except Exception as exc:  # the worker turns every failure into a decline
            return Decline(ann.job, ann.round, client, f"training failed: {exc}").encode()
        local = federated_arrays(self.model)
        delta = {k: (local[k] - published[k]).astype(np.float32) for k in local}
        samples = result.num_samples
        if hostile:
            delta = {k: (v * np.float32(attack.scale)).astype(np.float32) for k, v in delta.items()}
            samples = attack.samples or samples
        rng = np.random.default_rng(device_seed(self.seed, client, ann.round, "encode"))
        codec = make_codec(ann.codec)
        if hostile and attack.payload is not None:
            body = poisoned_body(ann.codec, delta, attack.payload, rng)
        else:
            ef = error_feedback(ann.codec)
            target = {k: v + residuals[client][k] for k, v in delta.items()} if ef and client in residuals else delta
            try:
                body = codec.encode(target, rng)
            except (ValueError, ArithmeticError) as exc:  # the agent declines what it cannot encode
                return Decline(ann.job, ann.round, client, f"cannot encode the update: {exc}").encode()
            if ef:
                sent = codec.decode(body, TensorSpec.of(target))
                residuals[client] = {k: (target[k] - sent[k]).astype(np.float32) for k in target}
        return Update(job=ann.job, round=ann.round, sender=client, update_id=f"{client}-r{ann.round}",
                      num_samples=samples, codec=ann.codec, base_model=ann.model_digest, body=body,
                      loss=result.loss).encode()

    def accuracy(self, arrays: dict[str, np.ndarray]) -> float:
        from fedge.torchkit import evaluate, load_federated

        load_federated(self.eval_model, arrays)
        return float(evaluate(self.eval_model, self.test, "cross_entropy", 1024)["accuracy"])


def poisoned_body(spec: dict[str, Any], delta: dict[str, np.ndarray], value: float, rng: np.random.Generator) -> bytes:
    """Bytes in the codec ``spec`` that decode to ``value`` (NaN or Inf): the
    quantized codecs carry it in a scale, the dense ones in an entry."""
    from fedge import tensors
    from fedge.codecs import make_codec

    inner = {k: v for k, v in spec.items() if k != "lossless"}
    name = spec["name"]
    if name in ("none", "fp16"):
        dtype = np.float32 if name == "none" else np.float16
        arrays = {k: np.array(v, dtype=dtype) for k, v in delta.items()}
        next(iter(arrays.values())).reshape(-1)[0] = value
        raw = tensors.pack(arrays)
    elif name in ("int2", "int4", "int8"):
        parsed, metadata = tensors.unpack_with_metadata(make_codec(inner).encode(delta, rng))
        arrays = {k: np.array(v) for k, v in parsed.items()}
        scales = next(k for k in arrays if k.startswith("s/"))
        arrays[scales][...] = value
        raw = tensors.pack(arrays, metadata)
    else:
        raise SystemExit(f"no non-finite payload is crafted for codec {name!r}")
    lossless = spec.get("lossless")
    if lossless == "zlib":
        return zlib.compress(raw, 6)
    if lossless:
        raise SystemExit(f"no non-finite payload is crafted for the lossless stage {lossless!r}")
    return raw


# --- the shell -------------------------------------------------------------------


@dataclass
class Shell:
    """Feeds the round core and keeps what a run reports; an exception that
    escapes the core is a crash: recorded, and the run goes on."""

    core: Any
    crashes: list[dict[str, Any]] = field(default_factory=list)
    finished: list[Any] = field(default_factory=list)
    announcement: Any = None

    def start(self, now: float) -> None:
        self._do(lambda: self.core.start(now), "start")

    def feed(self, event: Any) -> None:
        self._do(lambda: self.core.handle(event), type(event).__name__)

    def _do(self, step: Any, what: str) -> None:
        from aggregator.rounds import PublishAnnouncement, RoundFinished
        from fedge import wire
        from fedge.messages import RoundAnnouncement

        try:
            actions = step()
        except Exception as exc:
            self.crashes.append({"event": what, "round": self.core.next_round,
                                 "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        for a in actions:
            if isinstance(a, PublishAnnouncement):
                self.announcement = RoundAnnouncement.parse(wire.decode(a.message))
            elif isinstance(a, RoundFinished):
                self.finished.append(a)


_FLEETS: dict[tuple[str, int], Fleet] = {}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    # The core logs every refused update; the records count them.
    logging.getLogger("fedge").setLevel(logging.CRITICAL)


def run_one(task_name: str, task: Task, defence: str, server: dict[str, Any], attack_name: str, rounds: int,
            seed: int, sections: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from aggregator.rounds import ClientStatus, MessageArrived, TimerFired
    from aggregator.service import build_core
    from fedge import codecs

    started = time.perf_counter()
    attack = ATTACKS[attack_name]
    fleet = _FLEETS.get((task_name, seed))
    if fleet is None:
        fleet = _FLEETS[(task_name, seed)] = Fleet(task, seed)
    cfg = job_config(task, server, rounds, seed, sections)
    cfg.check()
    clients = [f"c{i:02d}" for i in range(CLIENTS)]
    hostile = set(clients[CLIENTS - attack.attackers:]) if attack.attackers else set()
    core = build_core(cfg)
    shell = Shell(core)
    now = 0.0
    shell.start(now)
    info = {"codecs": codecs.supported()}  # as an agent's presence advertises it
    for c in clients:
        shell.feed(ClientStatus(c, True, info, now))
    now += cfg.selection.settle_s
    shell.feed(TimerFired(now))

    curve: list[float] = []
    rejected: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    closed_by: Counter[str] = Counter()
    clipped = capped = declined = 0
    left_out: Counter[str] = Counter()
    late_left_out: Counter[str] = Counter()  # in the last quarter of the rounds
    streak: Counter[str] = Counter()  # consecutive rounds each device was left out, up to now
    longest: Counter[str] = Counter()  # the longest such run per device
    residuals: dict[str, dict[str, np.ndarray]] = {}
    stalled: str | None = None
    round_seconds: list[float] = []
    bounds: list[float | None] = []
    medians: list[float | None] = []
    while len(shell.finished) < rounds:
        ann = shell.announcement
        if ann is None or ann.state != "open":
            stalled = f"no round open after {len(shell.finished)} rounds (announcement: {getattr(ann, 'state', None)})"
            break
        done = len(shell.finished)
        opened = now
        published = core.models.published
        for i, client in enumerate(ann.selected):
            message = fleet.message(ann, client, clients.index(client), published, attack, client in hostile,
                                    residuals)
            now = opened + 0.1 * (i + 1)
            shell.feed(MessageArrived(client, message, now))
            shell.feed(TimerFired(now))  # the service ticks after every event
        if len(shell.finished) == done:  # not closed by quorum: the deadline closes it
            now = opened + ann.deadline_s
            shell.feed(TimerFired(now))
        if len(shell.finished) == done:
            stalled = f"round {ann.round} still open after its deadline"
            break
        now += 0.1
        fin = shell.finished[-1]
        rec = fin.record
        curve.append(round(fleet.accuracy(fin.model), 4))
        rejected.update(rec.rejected)
        if rec.status != "ok":
            failures[rec.failure or "too_few_updates"] += 1
        closed_by[rec.closed_by] += 1
        clipped += rec.clipped
        capped += rec.weight_capped
        declined += rec.declined
        left_out.update(rec.left_out)
        if len(curve) > 3 * rounds // 4:
            late_left_out.update(rec.left_out)
        for c in clients:
            streak[c] = streak[c] + 1 if c in rec.left_out else 0
            longest[c] = max(longest[c], streak[c])
        round_seconds.append(rec.seconds)
        bounds.append(rec.norm_bound)
        norms = core.defence_history.norms
        medians.append(float(f"{norms[-1]:.4g}") if rec.clients and norms else None)
    wall = time.perf_counter() - started
    return {
        "task": task_name, "defence": defence, "attack": attack_name, "seed": seed,
        "attackers": sorted(hostile), "attacker_samples": [fleet.samples(clients.index(c)) for c in sorted(hostile)],
        "rounds_run": len(curve),
        "final_accuracy": curve[-1] if curve else None,
        "best_accuracy": max(curve) if curve else None,
        "last5_mean_accuracy": round(statistics.fmean(curve[-5:]), 4) if curve else None,
        "rounds_failed": sum(failures.values()), "failures": dict(failures),
        "updates_rejected": sum(rejected.values()), "rejected": dict(rejected),
        "declined": declined, "closed_by": dict(closed_by),
        "round_seconds_simulated_median": statistics.median(round_seconds) if round_seconds else None,
        "clipped": clipped, "weight_capped": capped,
        "left_out": {"attackers": sum(n for c, n in left_out.items() if c in hostile),
                     "honest": sum(n for c, n in left_out.items() if c not in hostile),
                     "per_device": dict(sorted(left_out.items())),
                     # the longest run of consecutive rounds an honest device sat out: the bar is that no
                     # honest device is left out round after round
                     "honest_longest_streak": max((longest[c] for c in clients if c not in hostile), default=0),
                     "honest_last_quarter": sum(n for c, n in late_left_out.items() if c not in hostile)},
        "crashes": shell.crashes, "stalled": stalled,
        "counters": dict(core.counters),
        "accuracy_curve": curve,
        "norm_bound_curve": bounds,
        "median_update_norm_curve": medians,
        "wall_seconds": round(wall, 2),
    }


# --- the report ------------------------------------------------------------------


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((a - b) * 100, 2)


def add_drops(runs: list[dict[str, Any]]) -> None:
    final = {(r["task"], r["defence"], r["attack"]): r["final_accuracy"] for r in runs if r["seed"] == 0}
    for r in runs:
        r["drop_points_vs_clean_same_defence"] = _points(final.get((r["task"], r["defence"], "clean")),
                                                         r["final_accuracy"])
        r["drop_points_vs_clean_no_defence"] = _points(final.get((r["task"], "none", "clean")), r["final_accuracy"])


def bar_verdicts(runs: list[dict[str, Any]], noise: dict[str, Any]) -> dict[str, Any]:
    """Per task and attack, under the defaults: the drop against the
    defaults' clean run, and whether it crashed or stalled."""
    out: dict[str, Any] = {
        "statement": f"with the defaults, one attacker among ten costs at most {BAR_POINTS:g} point of final "
                     "accuracy, and no attack crashes or stalls anything",
        "drop": "final accuracy of the defaults' clean run minus the attacked run's, in points; where the task "
                "runs several seeds of every attack, the mean over seeds of (clean - attacked) with the same seed",
        "per_task": {},
    }
    misses: list[str] = []
    for task in sorted({r["task"] for r in runs}):
        by = {r["attack"]: r for r in runs if r["task"] == task and r["defence"] == "defaults" and r["seed"] == 0}
        verdicts: dict[str, Any] = {}
        for attack, r in by.items():
            if attack == "clean":
                continue
            paired = paired_drops(runs, task, attack)
            drop = statistics.fmean(paired) if len(paired) > 1 else r["drop_points_vs_clean_same_defence"]
            drop = None if drop is None else round(drop, 2)
            broke = any(x["crashes"] or x["stalled"] for x in runs
                        if (x["task"], x["defence"], x["attack"]) == (task, "defaults", attack))
            anywhere = [f"{x['defence']}" for x in runs if x["task"] == task and x["attack"] == attack
                        and (x["crashes"] or x["stalled"])]
            one = ATTACKS[attack].attackers == 1 and not ATTACKS[attack].absent
            meets = None if drop is None else (drop <= BAR_POINTS and not broke)
            v: dict[str, Any] = {"drop_points": drop, "drop_points_seed0": r["drop_points_vs_clean_same_defence"],
                                 "drop_points_per_seed": paired, "crashed": bool(r["crashes"]), "stalled": r["stalled"],
                                 "crashed_or_stalled_under": anywhere,
                                 "in_scope": one, "meets": meets}
            if ATTACKS[attack].absent:
                v["note"] = "no attack: what a perfect defence leaves, the floor of every attack's drop"
            elif not one:
                v["note"] = f"{ATTACKS[attack].attackers} attackers: beyond the bar's one among ten; reported"
            if r["closed_by"].get("deadline"):
                v["rounds_closed_by_deadline"] = r["closed_by"]["deadline"]
                v["slowed"] = (f"no stall, but {r['closed_by']['deadline']} of {r['rounds_run']} rounds waited for "
                               "their deadline instead of closing on quorum: a refused update is not a response")
            verdicts[attack] = v
            if one and meets is False:
                misses.append(f"{task}/{attack} ({drop} points)")
        out["per_task"][task] = verdicts
    out["misses"] = misses
    out["noise_floor"] = noise
    return out


def paired_drops(runs: list[dict[str, Any]], task: str, attack: str) -> list[float]:
    """(clean - attacked) final accuracy under the defaults, in points, per
    seed that ran both."""
    final = {(r["attack"], r["seed"]): r["final_accuracy"] for r in runs
             if r["task"] == task and r["defence"] == "defaults" and r["final_accuracy"] is not None}
    return [round((final[("clean", s)] - final[(attack, s)]) * 100, 2)
            for a, s in sorted(final) if a == attack and ("clean", s) in final]


def noise_floor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Spread of the defaults' clean final accuracy over seeds: how big a
    drop one run can show with no attacker at all."""
    out = {}
    for task in sorted({r["task"] for r in runs}):
        finals = [r["final_accuracy"] for r in runs if r["task"] == task and r["defence"] == "defaults"
                  and r["attack"] == "clean" and r["final_accuracy"] is not None]
        if len(finals) > 1:
            out[task] = {"seeds": len(finals), "final_accuracies": finals,
                         "range_points": round((max(finals) - min(finals)) * 100, 2),
                         "stdev_points": round(statistics.stdev(finals) * 100, 2)}
    return out


def table(runs: list[dict[str, Any]], defences: list[str], attacks: list[str]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in runs):
        lines.append(f"\n{task}: final accuracy (%), drop vs the same defence's clean run in points")
        lines.append(f"{'attack':<14}" + "".join(f"{d:>20}" for d in defences))
        for a in attacks:
            cells = []
            for d in defences:
                r = next((x for x in runs if (x["task"], x["defence"], x["attack"], x["seed"]) == (task, d, a, 0)),
                         None)
                if r is None or r["final_accuracy"] is None:
                    cells.append(f"{'-':>20}")
                    continue
                drop = r["drop_points_vs_clean_same_defence"]
                mark = "!" if r["crashes"] or r["stalled"] else ""
                text = f"{r['final_accuracy'] * 100:.1f}" + (f" ({-drop:+.1f})" if drop is not None and a != "clean"
                                                              else "") + mark
                cells.append(f"{text:>20}")
            lines.append(f"{a:<14}" + "".join(cells))
    return "\n".join(lines)


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=None, help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    ap.add_argument("--defences", default=None, help="comma-separated (default: all, with any --defence)")
    ap.add_argument("--attacks", default=None, help=f"comma-separated, of {', '.join(ATTACKS)} (default: all)")
    ap.add_argument("--defence", action="append", default=[], metavar="NAME:JSON",
                    help="an extra defence: a name and its [server] keys as JSON (repeat)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the task's)")
    ap.add_argument("--noise-seeds", type=int, default=2,
                    help="extra seeds of the defaults' clean run (of every attack, for digits), for the noise "
                         "floor of one run's accuracy")
    ap.add_argument("--quick", action="store_true", help="digits only, 10 rounds, no noise seeds: a smoke run")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    defences = dict(DEFENCES)
    for spec in args.defence:
        name, _, keys = spec.partition(":")
        defences[name] = json.loads(keys)
    tasks = _names(args.tasks, TASKS, "tasks") if args.tasks else list(TASKS)
    if args.quick:
        tasks, args.rounds, args.noise_seeds = ["digits"], args.rounds or 10, 0
    chosen_defences = _names(args.defences, defences, "defences") if args.defences else list(defences)
    attacks = _names(args.attacks, ATTACKS, "attacks") if args.attacks else list(ATTACKS)
    if "mnist_2nn" in tasks and not (MNIST is not None and MNIST.is_file()):
        print(f"MNIST not found ({MNIST or 'FEDGE_DATA is not set'}): set FEDGE_DATA to the directory that holds "
              "mnist.npz; skipping mnist_2nn", file=sys.stderr)
        tasks.remove("mnist_2nn")

    jobs = [(t, d, a, 0) for t in tasks for d in chosen_defences for a in attacks]
    if "defaults" in chosen_defences and "clean" in attacks:
        jobs += [(t, "defaults", a, s) for t in tasks for a in attacks for s in range(1, args.noise_seeds + 1)
                 if a == "clean" or TASKS[t].seed_every_attack]
    jobs.sort(key=lambda j: -TASKS[j[0]].rounds * (20 if j[0] == "mnist_2nn" else 1))  # long ones first

    started = time.perf_counter()
    code = code_state()
    sources = source_digests()
    runs: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(run_one, t, TASKS[t], d, defences[d], a, args.rounds or TASKS[t].rounds, s):
                   (t, d, a, s) for t, d, a, s in jobs}
        for fut in as_completed(futures):
            t, d, a, s = futures[fut]
            try:
                r = fut.result()
            except Exception as exc:  # outside the core (training, evaluation): a benchmark failure, not a crash
                r = {"task": t, "defence": d, "attack": a, "seed": s, "error": f"{type(exc).__name__}: {exc}",
                     "final_accuracy": None, "best_accuracy": None, "crashes": [], "stalled": None,
                     "closed_by": {}}
            runs.append(r)
            note(f"[{len(runs)}/{len(jobs)}] {t} {d} {a} seed {s}: final {r['final_accuracy']} "
                  f"rejected {r.get('rejected')} crashes {len(r['crashes'])} stalled {r['stalled']} "
                  f"({r.get('wall_seconds')} s)")
    order = {(t, d, a, s): i for i, (t, d, a, s) in
             enumerate((t, d, a, s) for t in tasks for d in chosen_defences for a in attacks for s in range(10))}
    runs.sort(key=lambda r: order.get((r["task"], r["defence"], r["attack"], r["seed"]), 1 << 30))
    add_drops(runs)
    after = source_digests()
    code["changed_during_run"] = sorted(f for f, h in sources.items() if after.get(f) != h)
    if code["changed_during_run"]:
        print(f"warning: {code['changed_during_run']} changed during the run; its runs may mix versions",
              file=sys.stderr)
    noise = noise_floor(runs)
    bar = bar_verdicts(runs, noise)
    note(table(runs, chosen_defences, attacks))
    note(f"\nbar: {bar['statement']}\nmisses (one attacker, defaults): {bar['misses'] or 'none'}")

    cfg = AggregatorConfig()
    emit({
        "benchmark": "poisoning",
        "setup": {
            "core": "aggregator.rounds.RoundCore built by aggregator.service.build_core, in process, no broker",
            "clients": CLIENTS, "selection": {"fraction": 1.0, "min_clients": CLIENTS, "max_clients": CLIENTS,
                                              "quorum": cfg.selection.quorum, "deadline_s": cfg.selection.deadline_s},
            "codec": cfg.codec.spec, "downlink": {"codec": cfg.downlink.codec, "key_every": cfg.downlink.key_every},
            "devices": "train the published model (key + downlink delta) with edge_agent.training.train_round; "
                       "delta = local - published, encoded with the announced codec",
            "attackers": "the last clients: c09 (one), c07-c09 (three)",
            "tasks": {t: {"model": TASKS[t].model, "data": TASKS[t].data, "data_args": TASKS[t].data_args,
                          "rounds": args.rounds or TASKS[t].rounds, "training": TASKS[t].training,
                          "note": TASKS[t].note} for t in tasks},
            "defences": {d: {"server": defences[d], "effective": _effective(defences[d])} for d in chosen_defences},
            "attacks": {a: ATTACKS[a].description for a in attacks},
            "seed": 0, "noise_seeds": args.noise_seeds, "quick": args.quick,
            "simulated_time": "messages arrive 0.1 s apart; a round not closed by quorum closes at its deadline",
        },
        "machine": machine(),
        "code": code,
        "bar": bar,
        "table_final_accuracy": {t: {d: {r["attack"]: r["final_accuracy"] for r in runs
                                         if r["task"] == t and r["defence"] == d and r["seed"] == 0}
                                     for d in chosen_defences} for t in tasks},
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }, args.out)


CODE = ("aggregator", "edge_agent", "fedge")


def code_state() -> dict[str, Any]:
    """The commit and uncommitted changes to the code a run imports."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(REPO)]
        out["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                       check=True).stdout.strip()
        out["uncommitted"] = subprocess.run([*git, "status", "--porcelain", "--", *CODE], capture_output=True,
                                            text=True, check=True).stdout.splitlines()
    return out


def source_digests() -> dict[str, str]:
    """sha256 of each source file of the code a run imports, so that an edit
    made while the benchmark runs shows (a file added meanwhile cannot change
    a run unless an edited one imports it)."""
    return {p.relative_to(REPO).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in CODE for p in sorted((REPO / d).rglob("*.py"))}


def _effective(server: dict[str, Any]) -> dict[str, Any]:
    """The defence keys a run used: the shipped defaults with ``server`` over them."""
    srv = updated(AggregatorConfig(), server=dict(server)).server
    keys = ("aggregation", "clip", "clip_norm", "clip_multiplier", "weight_cap", "trim_fraction", "krum_f", "krum_m")
    return {k: getattr(srv, k) for k in keys}


if __name__ == "__main__":
    main()
