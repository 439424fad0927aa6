"""The aggregator's state directory: its crash-safe files.

``checkpoint.safetensors``: the global model, the server optimizer's slots
and a JSON ``meta`` entry, in one safetensors file so one rename publishes
all of it. ``round.json``: the round that is open (its selection), written
when a round opens. ``rounds.jsonl``: one line per closed round.

Every file is replaced atomically (``fedge.files.atomic_write``): a SIGKILL
or power cut leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedge import tensors
from fedge.files import atomic_write, writable_dir

CHECKPOINT = "checkpoint.safetensors"
OPEN_ROUND = "round.json"
ROUND_LOG = "rounds.jsonl"
_META_KEY = "__fedge_meta__"


class StateDir:
    """The aggregator's state directory (the device's twin is
    ``edge_agent.state.StateDir``)."""

    def __init__(self, root: str | Path, writable: bool = True) -> None:
        """Made if missing and proved writable (else one ``ConfigError``
        line naming job.state_dir), so that a job that could not save its
        first checkpoint never starts; ``writable=False`` only reads (a
        report)."""
        self.root = writable_dir(root, "job.state_dir") if writable else Path(root)

    # checkpoint ---------------------------------------------------------------

    def save_checkpoint(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        blob = dict(arrays)
        blob[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write(self.root / CHECKPOINT, tensors.pack(blob))

    def checkpoint_time(self) -> float | None:
        """Unix time the checkpoint was written, or None when there is none."""
        try:
            return (self.root / CHECKPOINT).stat().st_mtime
        except OSError:
            return None

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        path = self.root / CHECKPOINT
        if not path.exists():
            return None
        arrays = tensors.unpack(path.read_bytes())
        raw = arrays.pop(_META_KEY, None)
        if raw is None:
            raise ValueError(f"{path} has no fedge metadata; it is not an aggregator checkpoint")
        return arrays, json.loads(raw.tobytes().decode())

    # open round ----------------------------------------------------------------

    def save_open_round(self, record: dict[str, Any], durable: bool = True) -> None:
        self.save_json(OPEN_ROUND, record, durable)

    def load_open_round(self) -> dict[str, Any] | None:
        return self.load_json(OPEN_ROUND) or None

    # small JSON state ------------------------------------------------------------

    def save_json(self, name: str, data: dict[str, Any], durable: bool = True) -> None:
        atomic_write(self.root / name, json.dumps(data).encode(), durable)

    def load_json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # round log -----------------------------------------------------------------

    @property
    def round_log(self) -> Path:
        return self.root / ROUND_LOG

    def logged_rounds(self) -> set[int]:
        """Round numbers already in the log (tolerates a torn last line)."""
        done: set[int] = set()
        if not self.round_log.exists():
            return done
        for line in self.round_log.read_text().splitlines():
            try:
                done.add(int(json.loads(line)["round"]))
            except (ValueError, KeyError, TypeError):
                continue
        return done

    def append_round(self, record: dict[str, Any]) -> None:
        path = self.round_log
        # A crash can leave a torn last line; start on a fresh line after it.
        prefix = b""
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    prefix = b"\n"
        with open(path, "ab") as f:
            f.write(prefix + json.dumps(record).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
