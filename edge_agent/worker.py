"""The training worker: a child process that owns PyTorch.

Run as ``python -m edge_agent.worker``. It reads framed requests on stdin
and writes framed replies on stdout; a frame is an 8-byte little-endian
length and a fedge wire envelope (no pickle across the pipe either):

* ``TRAIN_REQUEST``: header {model, model_args, data, data_args, plan, seed},
  body = the global model's tensors (safetensors, float32).
* ``TRAIN_RESULT``: header {num_samples, loss, steps, seconds, max_rss_bytes}, body = the
  delta local - global (safetensors, float32).
* ``TRAIN_ERROR``: header {error}.

A crash or out-of-memory kill here costs one round on one device; the
agent's connection lives in the parent and carries on. Models and data sets
are cached between requests (a warm worker serves many rounds, and in a
simulated fleet many devices).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time
from collections import OrderedDict
from typing import Any, BinaryIO

FRAME = struct.Struct("<Q")
MAX_FRAME = 4 << 30



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

    def get(self, key: str, make: Any) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    import numpy as np
    import torch

    from edge_agent.training import train_round
    from fedge import tensors, wire
    from fedge.messages import TrainingPlan
    from fedge.torchkit import build_model, federated_arrays, load_data, load_federated
    from fedge.wire import Kind

    threads = int(os.environ.get("FEDGE_WORKER_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    models = _Cache(4)
    datasets = _Cache(int(os.environ.get("FEDGE_WORKER_DATA_CACHE", "256")))

    while True:
        frame = read_frame(inp)
        if frame is None:
            return
        started = time.perf_counter()
        try:
            env = wire.decode(frame)
            if env.kind != Kind.TRAIN_REQUEST:
                raise ValueError(f"unexpected {env.kind.name} request")
            h = env.header
            model_spec = (h["model"], h.get("model_args", {}))
            data_spec = (h["data"], h.get("data_args", {}))
            model = models.get(json.dumps(model_spec, sort_keys=True), lambda s=model_spec: build_model(*s))
            data = datasets.get(json.dumps(data_spec, sort_keys=True), lambda s=data_spec: load_data(*s))
            global_arrays = tensors.unpack(env.body)
            load_federated(model, global_arrays)
            result = train_round(model, data, TrainingPlan.from_json(h["plan"]), int(h["seed"]))
            local = federated_arrays(model)
            delta = {k: (local[k] - global_arrays[k]).astype(np.float32) for k in local}
            reply = wire.encode(
                Kind.TRAIN_RESULT,
                {"num_samples": result.num_samples, "loss": result.loss, "steps": result.steps,
                 "seconds": time.perf_counter() - started, "max_rss_bytes": _max_rss_bytes()},
                tensors.pack(delta),
            )
        except Exception as exc:  # every failure becomes a reply; the loop goes on
            logging.getLogger("fedge.worker").debug("training failed", exc_info=True)
            reply = wire.encode(Kind.TRAIN_ERROR, {"error": f"{type(exc).__name__}: {exc}"[:1000]})
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
