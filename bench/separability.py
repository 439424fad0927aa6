"""Can the server tell a sign-flipper from an honest device late in a job?

``bench/poisoning.py`` measures that a sign-flipper among ten costs about
2 points at round 400 on the digits split, against a floor of about 0.2
(the same device absent). The direction filter's reference (a momentum of
what the round's updates agreed on) cannot separate it late: near
convergence the updates of a non-IID fleet cancel, the reference is small
and every cosine sits near 0. This benchmark asks whether a better
reference would: one the server computes itself, training the published
model on data it holds (FLTrust's "root data", Cao et al. 2021), which
points where the whole distribution's loss goes down whatever the devices
send.

It runs ``bench/poisoning.py``'s digits job with the defaults (the real
round core, devices training the published model, int2 updates), and each
round trains the published model on a server-held IID sample of the
training split (``ROOT``: 104 images, which the devices may hold too) with
the job's plan. Every update the server receives is decoded as the server
sees it, and its cosine to that root update recorded. Per window of rounds
and per device: the mean and spread of the cosines, how often the attacker
has the lowest cosine of its round, and the share of honest updates below
0 (what a cutoff at 0, FLTrust's, would leave out).

    python bench/separability.py --out bench/results/separability.json
    python bench/separability.py --rounds 20          # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import poisoning as P
from bench._common import emit, machine

# A server-held sample: one of 13 IID shares of the digits training split (seed 1).
ROOT = {"split": "train", "client": 0, "clients": 13, "partition": "iid", "seed": 1}
ATTACKER = f"c{P.CLIENTS - 1:02d}"


class RootFleet(P.Fleet):
    """The poisoning benchmark's ten devices, and a server that trains the
    published model on its own sample each round and measures every
    update's cosine to that."""

    def __init__(self, task: P.Task, seed: int) -> None:
        from fedge.torchkit import build_model, load_data

        super().__init__(task, seed)
        self.root = load_data(task.data, ROOT)
        self.root_model = build_model(task.model)
        self.rounds: list[dict[str, Any]] = []

    def _root_update(self, ann: Any, published: dict[str, np.ndarray]) -> np.ndarray:
        from edge_agent.training import train_round
        from fedge.torchkit import federated_arrays, load_federated

        load_federated(self.root_model, published)
        train_round(self.root_model, self.root, ann.training, P.device_seed(self.seed, "server", ann.round, "train"))
        local = federated_arrays(self.root_model)
        return np.concatenate([(local[k] - published[k]).ravel() for k in sorted(local)])

    def message(self, ann: Any, client: str, index: int, published: dict[str, np.ndarray], attack: P.Attack,
                hostile: bool, residuals: dict[str, dict[str, np.ndarray]]) -> bytes:
        from fedge import wire
        from fedge.codecs import make_codec
        from fedge.messages import Update
        from fedge.tensors import TensorSpec

        if not self.rounds or self.rounds[-1]["round"] != ann.round:
            self.rounds.append({"round": ann.round, "g": self._root_update(ann, published), "cos": {}})
        message = super().message(ann, client, index, published, attack, hostile, residuals)
        env = wire.decode(message)
        if env.kind.name == "UPDATE":
            update = Update.parse(env)
            delta = make_codec(ann.codec).decode(update.body, TensorSpec.of(published))
            v = np.concatenate([delta[k].ravel() for k in sorted(delta)])
            g = self.rounds[-1]["g"]
            den = float(np.linalg.norm(v) * np.linalg.norm(g))
            if den > 0:
                self.rounds[-1]["cos"][client] = float(v @ g) / den
        return message


def summary(rounds: list[dict[str, Any]], windows: list[tuple[int, int]], hostile: bool) -> list[dict[str, Any]]:
    out = []
    for lo, hi in windows:
        seg = [r["cos"] for r in rounds[lo:hi]]
        clients = sorted({c for cos in seg for c in cos})
        per = {c: [cos[c] for cos in seg if c in cos] for c in clients}
        honest = [v for c, vs in per.items() if c != ATTACKER or not hostile for v in vs]
        row: dict[str, Any] = {
            "rounds": f"{lo + 1}-{hi}",
            "per_device_mean_sd": {c: [round(statistics.fmean(vs), 3), round(statistics.pstdev(vs), 3)]
                                   for c, vs in per.items() if vs},
            "honest_below_0": round(sum(v < 0 for v in honest) / len(honest), 3) if honest else None,
            "honest_p10": round(float(np.percentile(honest, 10)), 3) if honest else None,
        }
        if hostile:
            row["attacker_lowest_of_round"] = sum(1 for cos in seg if cos and min(cos, key=cos.__getitem__) == ATTACKER)
            row["rounds_in_window"] = len(seg)
            means = {c: statistics.fmean(vs) for c, vs in per.items() if vs and c != ATTACKER}
            row["honest_devices_with_mean_below_attackers"] = sorted(
                c for c, m in means.items() if ATTACKER in per and m <= statistics.fmean(per[ATTACKER]) + 0.05)
        out.append(row)
    return out


def run(attack: str, rounds: int, seed: int) -> dict[str, Any]:
    P.Fleet = RootFleet  # type: ignore[misc]  # the run builds its fleet from the module's name
    task = P.TASKS["digits"]
    started = time.perf_counter()
    result = P.run_one("digits", task, "defaults", P.DEFENCES["defaults"], attack, rounds, seed)
    fleet = P._FLEETS[("digits", seed)]
    assert isinstance(fleet, RootFleet)
    step = max(1, rounds // 4)
    windows = [(i, min(rounds, i + step)) for i in range(0, rounds, step)]
    return {
        "attack": attack, "seed": seed, "rounds_run": result["rounds_run"],
        "final_accuracy": result["final_accuracy"], "left_out": result["left_out"],
        "updates_measured": sum(len(r["cos"]) for r in fleet.rounds),
        "windows": summary(fleet.rounds, windows, attack != "clean"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", default="clean,sign_flip")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    attacks = args.attacks.split(",")
    for a in attacks:
        if a not in P.ATTACKS:
            ap.error(f"unknown attack {a!r}; use one of {', '.join(P.ATTACKS)}")
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(run, attacks, [args.rounds] * len(attacks), [args.seed] * len(attacks)))
    emit({"benchmark": "separability", "machine": machine(), "root_data": ROOT, "rounds": args.rounds,
          "runs": runs}, args.out)


if __name__ == "__main__":
    main()
