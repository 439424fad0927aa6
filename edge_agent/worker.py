"""The training worker: a child process that owns PyTorch.

Run as ``python -m edge_agent.worker``. It reads framed requests on stdin
and writes framed replies on stdout; a frame is an 8-byte little-endian
length and a fedge wire envelope (no pickle across the pipe either):

* ``TRAIN_REQUEST``: header {model, model_args, data, data_args, plan, seed},
  body = the global model's tensors (safetensors, float32).
* ``TRAIN_RESULT``: header {num_samples, loss, steps, seconds,
  reference_seconds, max_rss_bytes}, body = the delta local - global
  (safetensors, float32). ``seconds`` is the request's wall time here;
  ``reference_seconds`` the same number (see batches below).
* ``TRAIN_ERROR``: header {error}.

Batches, for a simulated fleet: many devices training from the same global
model in one request (``edge_agent.batched`` trains them together, each
getting the update ``train_round`` would give it alone, to float32
rounding):

* ``TRAIN_BATCH``: header {model, model_args, plan, items, engine}, body =
  the global model's tensors, as for ``TRAIN_REQUEST``. ``items`` is a list
  of 1 to ``MAX_BATCH`` objects {data, data_args, seed} (``data_args``
  optional, ``{}``), one a device; ``engine`` is optional: ``auto`` (the
  default), ``mlp``, ``vmap`` or ``loop`` (``batched.iter_train_many``).
  The header, items included, must fit the wire's 64 KB bound
  (``wire.MAX_HEADER_BYTES``): about 750 devices of ``fedge.datasets:mnist``
  named by client index. Split a larger fleet into batches (a pool of
  several workers needs several anyway).
* The reply is exactly one frame per item, in completion order: a
  ``TRAIN_RESULT`` with the header above plus ``index`` (the item's
  position in ``items``), or a ``TRAIN_ERROR`` {index, error}. A device
  that fails (its data do not load, its training diverges) fails alone.
  A batch whose header is wrong (a bad item, model, plan, engine or body)
  fails every item with the same error. Only when ``items`` cannot be read
  at all (not a list, empty, too long) is the reply one ``TRAIN_ERROR``
  with ``index`` -1, which stands for every item.
* ``seconds`` of an item is what the device cost in the batch: its group's
  training time (wall) divided by the group's devices; loading data and
  timing the reference are not counted. ``reference_seconds`` is what the
  device would cost trained alone on this host: once per (model, plan),
  cached, the batch's first device trains alone with ``train_round`` on a
  copy of the model, which gives the seconds of a local step; an item's is
  that times its ``steps``. (When the first ``CALIBRATION_DEVICES`` devices
  all fail to train alone, it is the item's ``seconds``.)

Deltas are written as they come and dropped (a 2NN's is 800 KB); a group
of devices holds one buffer at a time. Data are loaded for the batch
``BATCH_CHUNK`` items at a time.

A crash or out-of-memory kill here costs one round on one device (a batch:
its unanswered items); the agent's connection lives in the parent and
carries on. Models and data sets are cached between requests (a warm
worker serves many rounds, and in a simulated fleet many devices); a batch
uses the data sets cached and adds the ones it loads only while the cache
has room, so a fleet larger than the cache does not evict the devices it
holds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    from edge_agent.batched import Engine

FRAME = struct.Struct("<Q")
MAX_FRAME = 4 << 30
MAX_BATCH = 100_000  # items a TRAIN_BATCH may carry
BATCH_CHUNK = 1024  # items of a batch whose data are held at once
ENGINES = ("auto", "mlp", "vmap", "loop")
# Timing a device alone: after a one-step warm-up (a fresh worker's first
# step costs far more than the others), repeated while under this many
# seconds in all, at most this many runs, the fastest kept; a device that
# fails to train alone hands over to the next, up to this many.
CALIBRATION_SECONDS = 0.1
CALIBRATION_RUNS = 5
CALIBRATION_DEVICES = 3

log = logging.getLogger("fedge.worker")


def _max_rss_bytes() -> int:
    """This worker's peak resident memory so far (a warm worker's over all its rounds)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (n,) = FRAME.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is too large")
    data = stream.read(n)
    if len(data) < n:
        return None
    return data


def write_frame(stream: BinaryIO, data: bytes) -> None:
    stream.write(FRAME.pack(len(data)))
    stream.write(data)
    stream.flush()


class _Cache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, make: Any, evict: bool = True) -> Any:
        """The value for ``key``, made by ``make()`` on a miss and kept; with
        ``evict`` false, kept only if the cache has room (nothing is pushed
        out)."""
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        if evict or len(self.items) < self.size:
            self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value

    def find(self, key: str) -> Any:
        """The value for ``key``, or None."""
        return self.items.get(key)

    def put(self, key: str, value: Any) -> None:
        self.get(key, lambda: value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


class _Trainer:
    """What a warm worker keeps between requests (models, data sets, the
    seconds of a local step), and the two requests it answers."""

    def __init__(self) -> None:
        self.models = _Cache(4)
        self.datasets = _Cache(int(os.environ.get("FEDGE_WORKER_DATA_CACHE", "256")))
        self.step_seconds = _Cache(64)  # json [model spec, plan] -> seconds of a local step, alone

    def model(self, spec: tuple[str, dict[str, Any]]) -> Any:
        from fedge.torchkit import build_model

        return self.models.get(json.dumps(spec, sort_keys=True), lambda: build_model(*spec))

    def data(self, spec: tuple[str, dict[str, Any]], evict: bool = True) -> Any:
        from fedge.torchkit import load_data

        return self.datasets.get(json.dumps(spec, sort_keys=True), lambda: load_data(*spec), evict)

    def one(self, h: dict[str, Any], body: bytes, started: float) -> bytes:
        """A TRAIN_REQUEST's reply (exceptions are the caller's TRAIN_ERROR)."""
        import numpy as np

        from edge_agent.training import train_round
        from fedge import tensors, wire
        from fedge.messages import TrainingPlan
        from fedge.torchkit import federated_arrays, load_federated
        from fedge.wire import Kind

        model = self.model((h["model"], h.get("model_args", {})))
        data = self.data((h["data"], h.get("data_args", {})))
        global_arrays = tensors.unpack(body)
        load_federated(model, global_arrays)
        result = train_round(model, data, TrainingPlan.from_json(h["plan"]), int(h["seed"]))
        local = federated_arrays(model)
        delta = {k: (local[k] - global_arrays[k]).astype(np.float32) for k in local}
        seconds = time.perf_counter() - started
        return wire.encode(
            Kind.TRAIN_RESULT,
            {"num_samples": result.num_samples, "loss": result.loss, "steps": result.steps,
             "seconds": seconds, "reference_seconds": seconds, "max_rss_bytes": _max_rss_bytes()},
            tensors.pack(delta),
        )

    def batch(self, h: dict[str, Any], body: bytes, out: BinaryIO) -> None:
        """Answer a TRAIN_BATCH on ``out``: exactly one frame per item, or one
        frame with index -1 when ``items`` cannot be read."""
        from fedge import wire
        from fedge.wire import Kind

        items = h.get("items")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            got = f"{len(items)} items" if isinstance(items, list) else f"{type(items).__name__}"
            error = f"TRAIN_BATCH items must be a list of 1 to {MAX_BATCH} objects, not {got}"
            write_frame(out, wire.encode(Kind.TRAIN_ERROR, {"index": -1, "error": error}))
            return
        answered = bytearray(len(items))

        def reply(i: int, kind: Kind, header: dict[str, Any], payload: bytes = b"") -> None:
            write_frame(out, wire.encode(kind, {"index": i, **header}, payload))
            answered[i] = 1

        try:
            self._batch(h, items, body, reply)
        except Exception as exc:  # the batch as a whole: every item not yet answered gets it
            log.debug("training batch failed", exc_info=True)
            error = _describe(exc)
            for i in range(len(items)):
                if not answered[i]:
                    reply(i, Kind.TRAIN_ERROR, {"error": error})

    def _batch(self, h: dict[str, Any], items: list[Any], body: bytes,
               reply: Callable[..., None]) -> None:
        from edge_agent.batched import auto_group_size, choose_engine, local_steps
        from fedge import tensors
        from fedge.messages import TrainingPlan
        from fedge.torchkit import load_federated, num_examples
        from fedge.wire import Kind

        devices = [_batch_item(i, item) for i, item in enumerate(items)]
        model_spec = _model_spec(h)
        plan = TrainingPlan.from_json(h.get("plan"))
        engine = h.get("engine", "auto")
        if engine not in ENGINES:
            raise ValueError(f"TRAIN_BATCH engine {engine!r} is not one of {', '.join(ENGINES)}")
        model = self.model(model_spec)
        global_arrays = tensors.unpack(body)
        load_federated(model, global_arrays)  # names and shapes, once for the batch
        choice = engine if engine != "auto" else choose_engine(model, plan).engine
        # The loop engine trains device by device: each is its own group, timed alone.
        size = 1 if choice == "loop" else auto_group_size(model, plan, choice)
        key = json.dumps([list(model_spec), h["plan"]], sort_keys=True)

        for start in range(0, len(devices), BATCH_CHUNK):
            loaded = []
            for i in range(start, min(start + BATCH_CHUNK, len(devices))):
                data_spec, seed = devices[i]
                try:
                    data = self.data(data_spec, evict=False)
                except Exception as exc:
                    reply(i, Kind.TRAIN_ERROR, {"error": _describe(exc)})
                    continue
                loaded.append((i, data, seed, local_steps(num_examples(data), plan)))
            if self.step_seconds.find(key) is None:
                per_step = _calibrate(model, global_arrays, plan, [(d[1], d[2]) for d in loaded])
                if per_step is not None:
                    self.step_seconds.put(key, per_step)
            # Devices with as many steps as each other train fastest together (as
            # batched orders a group); stable: equal steps keep the items' order.
            loaded.sort(key=lambda d: -d[3])
            for g in range(0, len(loaded), size):
                self._group(model, global_arrays, plan, engine, loaded[g : g + size],
                            self.step_seconds.find(key), reply)

    def _group(self, model: Any, global_arrays: Any, plan: Any, engine: str, group: list[Any],
               per_step: float | None, reply: Callable[..., None]) -> None:
        """Train one group with ``iter_train_many`` and answer its items."""
        from edge_agent.batched import iter_train_many
        from fedge import tensors
        from fedge.wire import Kind

        started = time.perf_counter()
        try:
            outcomes = list(iter_train_many(model, global_arrays, [d[1] for d in group], plan,
                                            [d[2] for d in group], group_size=len(group),
                                            engine=cast("Engine", engine)))
        except Exception as exc:  # an engine that refuses (Unbatchable) or fails: this group's items
            log.debug("training a group failed", exc_info=True)
            for d in group:
                reply(d[0], Kind.TRAIN_ERROR, {"error": _describe(exc)})
            return
        seconds = (time.perf_counter() - started) / len(group)
        outcomes.reverse()
        while outcomes:
            j, outcome = outcomes.pop()  # dropped as soon as it is written
            index = group[j][0]
            if isinstance(outcome, Exception):
                reply(index, Kind.TRAIN_ERROR, {"error": _describe(outcome)})
                continue
            delta, result = outcome
            try:
                payload = tensors.pack(delta)
                reference = per_step * result.steps if per_step is not None else seconds
                header = {"num_samples": result.num_samples, "loss": result.loss, "steps": result.steps,
                          "seconds": seconds, "reference_seconds": reference, "max_rss_bytes": _max_rss_bytes()}
            except Exception as exc:
                reply(index, Kind.TRAIN_ERROR, {"error": _describe(exc)})
                continue
            del delta, outcome
            reply(index, Kind.TRAIN_RESULT, header, payload)


def _batch_item(i: int, item: object) -> tuple[tuple[str, dict[str, Any]], int]:
    """Item ``i`` of a TRAIN_BATCH as (data spec, seed); ValueError naming
    what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError(f"TRAIN_BATCH item {i} is {type(item).__name__}, not an object {{data, data_args, seed}}")
    unknown = set(item) - {"data", "data_args", "seed"}
    if unknown:
        raise ValueError(f"TRAIN_BATCH item {i} has unknown fields {sorted(unknown)}")
    data, args, seed = item.get("data"), item.get("data_args", {}), item.get("seed")
    if not isinstance(data, str) or not data:
        raise ValueError(f"TRAIN_BATCH item {i}: data must be a module:callable string, not {data!r}"[:300])
    if not isinstance(args, dict):
        raise ValueError(f"TRAIN_BATCH item {i}: data_args must be an object, not {type(args).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"TRAIN_BATCH item {i}: seed must be an integer, not {type(seed).__name__}")
    return (data, args), seed


def _model_spec(h: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    model, args = h.get("model"), h.get("model_args", {})
    if not isinstance(model, str) or not model:
        raise ValueError(f"TRAIN_BATCH model must be a module:callable string, not {model!r}"[:300])
    if not isinstance(args, dict):
        raise ValueError(f"TRAIN_BATCH model_args must be an object, not {type(args).__name__}")
    return model, args


def _calibrate(model: Any, global_arrays: Any, plan: Any, devices: list[tuple[Any, int]]) -> float | None:
    """Seconds a local step takes when one device trains alone with
    ``train_round`` (the first of ``devices`` that trains without failing),
    on a copy of ``model``; None when none of the first few does."""
    from edge_agent.training import train_round
    from fedge.torchkit import load_federated

    alone = copy.deepcopy(model)
    for data, seed in devices[:CALIBRATION_DEVICES]:
        best, spent, runs = float("inf"), 0.0, 0
        try:
            load_federated(alone, global_arrays)
            train_round(alone, data, dataclasses.replace(plan, max_steps=1), seed)  # warm-up: one step
            while runs < CALIBRATION_RUNS and (runs == 0 or spent < CALIBRATION_SECONDS):
                load_federated(alone, global_arrays)
                started = time.perf_counter()
                result = train_round(alone, data, plan, seed)
                took = time.perf_counter() - started
                spent += took
                runs += 1
                best = min(best, took / max(result.steps, 1))
        except Exception:
            log.debug("timing a device alone failed", exc_info=True)
            continue
        return best
    return None


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    import torch

    from fedge import wire
    from fedge.wire import Kind

    threads = int(os.environ.get("FEDGE_WORKER_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    trainer = _Trainer()

    while True:
        frame = read_frame(inp)
        if frame is None:
            return
        started = time.perf_counter()
        try:
            env = wire.decode(frame)
            if env.kind == Kind.TRAIN_BATCH:
                trainer.batch(env.header, env.body, out)  # writes its own replies
                continue
            if env.kind != Kind.TRAIN_REQUEST:
                raise ValueError(f"unexpected {env.kind.name} request")
            reply = trainer.one(env.header, env.body, started)
        except Exception as exc:  # every failure becomes a reply; the loop goes on
            log.debug("training failed", exc_info=True)
            reply = wire.encode(Kind.TRAIN_ERROR, {"error": _describe(exc)})
        write_frame(out, reply)


def _prefer_me_when_memory_runs_out() -> None:
    """Ask the kernel to kill this worker, not the agent, when memory runs
    out (raising one's own OOM score needs no privileges)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("800")
    except OSError:
        pass


def main() -> None:
    _prefer_me_when_memory_runs_out()
    # Frames own the real stdout; anything user code prints goes to stderr.
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    from fedge import logs

    logs.setup(os.environ.get("FEDGE_LOG_LEVEL", "WARNING"))
    serve(sys.stdin.buffer, frames_out)


if __name__ == "__main__":
    main()
