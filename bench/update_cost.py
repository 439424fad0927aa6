"""Aggregator CPU per update: what one int2 + zlib update of the MNIST 2NN
(199,210 parameters) costs the round core, in total and stage by stage.

The real round core (``aggregator.service.build_core`` from an
``AggregatorConfig``: job.model = fedge.models:mnist_2nn, the default codec
and defences) runs in process, without a broker, as in
``bench/poisoning.py``: the benchmark feeds ``ClientStatus`` for N + 1
devices, each round one ``MessageArrived`` per device but the last (so that
no measured update closes the round: the deadline does), and ``TimerFired``
to close it. Signing is on, as by default: every device has its own enrolled
Ed25519 key (``fedge_cli.identity.provision``) and signs its update; the
core verifies it through its ``verify`` hook, as the service sets it
(``aggregator.enrollment.Enrollment.verify``, the registry re-read check
included). Updates are real: a delta in one direction shared by the fleet
plus each device's own noise, encoded with the announced codec, so that the
direction filter admits them and the norm bound clips some, as in a
healthy round. Round 1 has no direction reference; it warms up and is not
measured.

Measured with ``time.process_time`` (CPU of this process, not wall time: the
machine may be shared): (a) the whole ``core.handle(MessageArrived(...))``
per update, median over rounds; (b) stage by stage, each the median over
repeats of the mean over a set of real messages:

* wire: ``wire.decode`` (preamble, header JSON, sha256 over the message);
* verify: the enrolled key's Ed25519 check (``Enrollment.verify``);
* update header: ``Update.parse``;
* zlib: the codec's lossless stage (``LosslessCodec._inflate``);
* header: ``tensors.unpack_with_metadata`` on the inflated body;
* unpack/dequantize: the rest of ``RoundUpdates.decode`` (the codec's
  checks, the 2-bit codes, scaling into the scratch model);
* norm/finite: the rest of ``RoundUpdates.measure`` (``measure`` and
  ``decode`` timed one after the other on each message: the norm's cost
  right after the decode, its data in cache, as in the core);
* cosine: ``tensors.dot(scratch, reference)`` (the direction filter);
* fold: scaling the scratch model and adding it to the round's sum
  (``RoundAggregate._fold_scratch``'s array work).

    python bench/update_cost.py [--updates 1000] [--rounds 5] [--repeats 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, machine, note

MODEL = "fedge.models:mnist_2nn"
JOB = "update-cost"


def cpu_per_call(fn: Callable[[Any], Any], items: list[Any], repeats: int) -> float:
    """Median over ``repeats`` of the CPU seconds per call of ``fn`` over ``items``."""
    runs = []
    for _ in range(repeats):
        t0 = time.process_time()
        for item in items:
            fn(item)
        runs.append((time.process_time() - t0) / len(items))
    return statistics.median(runs)


def cpu_alternating(fns: list[Callable[[Any], Any]], items: list[Any], repeats: int) -> list[float]:
    """CPU seconds per call of each of ``fns``, called one after the other on
    every item (so that their difference is not drift between two loops):
    the median over ``repeats``."""
    runs: list[list[float]] = [[] for _ in fns]
    clock = time.process_time
    for _ in range(repeats):
        spent = [0.0] * len(fns)
        for item in items:
            for i, fn in enumerate(fns):
                t0 = clock()
                fn(item)
                spent[i] += clock() - t0
        for i in range(len(fns)):
            runs[i].append(spent[i] / len(items))
    return [statistics.median(r) for r in runs]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


class Fleet:
    """N + 1 enrolled devices and the round core that believes them."""

    def __init__(self, n: int, workdir: Path, rounds: int) -> None:
        from aggregator.config import AggregatorConfig
        from aggregator.enrollment import Enrollment
        from aggregator.rounds import ClientStatus, TimerFired
        from aggregator.service import build_core
        from fedge import codecs
        from fedge.config import updated
        from fedge_cli.identity import provision

        state = workdir / "state"
        self.cfg = cfg = updated(
            AggregatorConfig(),
            job={"name": JOB, "model": MODEL, "seed": 0, "rounds": rounds + 2, "state_dir": str(state)},
            selection={"fraction": 1.0, "min_clients": n + 1, "deadline_s": 1e6},
        )
        cfg.check()
        self.clients = [f"d{i:05d}" for i in range(n + 1)]
        self.keys = provision(state, self.clients, workdir / "keys")[1]
        self.core = build_core(cfg)
        self.enrollment = Enrollment(state, cfg.limits.max_devices, cfg.limits.max_update_bytes)
        self.now = 0.0
        core = self.core
        core.verify = lambda client, env: self.enrollment.verify(client, env, core.roster.online, self.now)
        self.announcement: Any = None
        self.records: list[Any] = []
        self._take(core.start(self.now))
        info = {"codecs": codecs.supported()}
        for c in self.clients:
            self._take(core.handle(ClientStatus(c, True, info, self.now)))
        self.now += cfg.selection.settle_s
        self._take(core.handle(TimerFired(self.now)))
        self.codec_spec = core.codec_params
        rng = np.random.default_rng(12345)
        # The direction the fleet agrees on; each device adds its own noise.
        self.shared = {k: (rng.normal(size=s) * 0.01).astype(np.float32) for k, s in core.spec.entries}

    def _take(self, actions: list[Any]) -> list[Any]:
        from aggregator.rounds import PublishAnnouncement, RoundFinished
        from fedge import wire
        from fedge.messages import RoundAnnouncement

        for a in actions:
            if isinstance(a, PublishAnnouncement):
                self.announcement = RoundAnnouncement.parse(wire.decode(a.message))
            elif isinstance(a, RoundFinished):
                self.records.append(a.record)
        return actions

    def messages(self) -> list[tuple[str, bytes]]:
        """One signed update per device but the last, for the open round."""
        from fedge import wire
        from fedge.codecs import make_codec
        from fedge.messages import Update

        ann = self.announcement
        assert ann is not None and ann.state == "open", ann
        codec = make_codec(ann.codec)
        out = []
        for i, c in enumerate(self.clients[:-1]):
            rng = np.random.default_rng([ann.round, i])
            # Mostly the shared direction (cosines about 0.7), norms varying by device.
            delta = {k: (v * np.float32(0.5 + rng.random()) + (rng.normal(size=v.shape) * 0.01).astype(np.float32))
                     for k, v in self.shared.items()}
            body = codec.encode(delta, rng)
            plain = Update(job=JOB, round=ann.round, sender=c, update_id=f"u{ann.round}-{i}",
                           num_samples=int(500 + 100 * rng.random()), codec=ann.codec,
                           base_model=ann.model_digest, body=body, loss=0.5).encode()
            out.append((c, wire.seal(plain, self.keys[c])))
        return out

    def run_round(self) -> dict[str, Any]:
        """Feed one round's updates, timing each ``handle``; close it by the deadline."""
        from aggregator.rounds import MessageArrived, SendAck, TimerFired

        msgs = self.messages()
        ann = self.announcement
        receipts: Counter[str] = Counter()
        costs = []
        opened = self.now
        for i, (client, message) in enumerate(msgs):
            self.now = opened + 1e-3 * (i + 1)
            ev = MessageArrived(client, message, self.now)
            t0 = time.process_time()
            actions = self.core.handle(ev)
            costs.append(time.process_time() - t0)
            for a in actions:
                if isinstance(a, SendAck):
                    receipts[a.receipt] += 1
        closed = len(self.records)
        self.now = opened + ann.deadline_s + 1
        self._take(self.core.handle(TimerFired(self.now)))
        assert len(self.records) == closed + 1, "the round did not close at its deadline"
        rec = self.records[-1]
        return {"round": ann.round, "updates": len(msgs), "cpu_ms_per_update": ms(statistics.fmean(costs)),
                "cpu_ms_median_update": ms(statistics.median(costs)), "receipts": dict(receipts),
                "status": rec.status, "clients": rec.clients, "clipped": rec.clipped,
                "left_out": len(rec.left_out), "_messages": msgs}


def stages(fleet: Fleet, msgs: list[tuple[str, bytes]], repeats: int) -> dict[str, float]:
    """CPU per update of each step of the core's path for one update (see the module's docstring)."""
    from aggregator.fold import RunningSum
    from fedge import tensors, wire
    from fedge.codecs import make_codec
    from fedge.messages import Update

    core = fleet.core
    agg = core.updates
    spec = core.spec
    max_body = core.policy.max_update_bytes
    envs = [(c, wire.decode(m, max_body=max_body)) for c, m in msgs]
    bodies = [Update.parse(e).body for _, e in envs]
    codec = make_codec(fleet.codec_spec)
    raws = [codec._inflate(b, spec) for b in bodies]  # type: ignore[attr-defined]
    reference = agg.reference
    if reference is None:  # no reference held (direction off, or the job's first round): the round's mean
        reference = {k: v.copy() for k, v in fleet.shared.items()}
    online = core.roster.online

    def verify(item: tuple[str, Any]) -> None:
        fleet.enrollment.verify(item[0], item[1], online, fleet.now)

    def fold(_: Any) -> None:  # _fold_scratch's array work, at a coefficient below 1
        scale = np.float32(0.7)
        for name, a in agg.updates.scratch.items():
            np.multiply(a, scale, out=a)
            acc.acc[name] += a

    acc = RunningSum(spec)
    out = {
        "wire_decode": cpu_per_call(lambda m: wire.decode(m[1], max_body=max_body), msgs, repeats),
        "verify": cpu_per_call(verify, envs, repeats),
        "update_parse": cpu_per_call(lambda e: Update.parse(e[1]), envs, repeats),
        "zlib": cpu_per_call(lambda b: codec._inflate(b, spec), bodies, repeats),  # type: ignore[attr-defined]
        "header": cpu_per_call(tensors.unpack_with_metadata, raws, repeats),
    }
    decode, measure = cpu_alternating([agg.updates.decode, agg.updates.measure], bodies, repeats)
    out["unpack_dequantize"] = decode - out["zlib"] - out["header"]
    out["norm_finite"] = measure - decode
    agg.updates.measure(bodies[0])
    out["cosine"] = cpu_per_call(lambda _: tensors.dot(agg.updates.scratch, reference), bodies, repeats)
    out["fold"] = cpu_per_call(fold, bodies, repeats)
    out["_decode"] = decode
    out["_measure"] = measure
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=1000, help="updates per round (devices: one more)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    ap.add_argument("--repeats", type=int, default=7, help="repeats of each stage's timing (median)")
    ap.add_argument("--stage-updates", type=int, default=200, help="messages each stage is timed over")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("fedge").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-cost-") as tmp:
        note(f"provisioning {args.updates + 1} devices ...")
        fleet = Fleet(args.updates, Path(tmp), args.rounds)
        note("warm-up round ...")
        fleet.run_round()
        rounds = []
        for r in range(args.rounds):
            rounds.append(fleet.run_round())
            note(f"round {r + 1}/{args.rounds}: {rounds[-1]['cpu_ms_per_update']} ms/update")
        msgs = rounds[-1]["_messages"][: args.stage_updates]
        # The next round is open: its reference is the direction the measured rounds agreed on.
        st = stages(fleet, msgs, args.repeats)
        for r in rounds:
            del r["_messages"]
        msg_bytes = statistics.fmean(len(m) for _, m in msgs)
        core = fleet.core
    parts = ("wire_decode", "verify", "update_parse", "zlib", "header", "unpack_dequantize", "norm_finite",
             "cosine", "fold")
    handle = round(statistics.median(r["cpu_ms_per_update"] for r in rounds), 4)
    staged = sum(st[k] for k in parts)
    emit({
        "benchmark": "update_cost",
        "workload": {"model": MODEL, "parameters": core.spec.num_params, "codec": fleet.codec_spec,
                     "signing": "required (Ed25519, enrolled per device)", "defences": "defaults",
                     "updates_per_round": args.updates, "rounds_measured": args.rounds,
                     "update_bytes_mean": round(msg_bytes),
                     "timing": "time.process_time (CPU of this process), not wall time. handle: the whole "
                               "core.handle(MessageArrived) per update, mean over a round, median over rounds. "
                               "stages: median over repeats of the mean over stage_updates real messages; "
                               "other = handle - sum of stages (admission checks, receipts, Python glue)."},
        "machine": machine(),
        "handle_cpu_ms_per_update": handle,
        "stages_cpu_ms_per_update": {k: ms(st[k]) for k in parts},
        "stages_sum_ms": ms(staged),
        "other_ms": round(handle - ms(staged), 4),
        "decode_ms": ms(st["_decode"]), "measure_ms": ms(st["_measure"]),
        "bar": {"handle_le_1ms": handle <= 1.0},
        "rounds": rounds,
    }, args.out)


if __name__ == "__main__":
    main()
