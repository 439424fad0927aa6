"""The aggregator's models: the exact server model, the latest key model, and
the published model devices train from. No I/O.

* ``exact`` is what the server optimizer updates. Devices never see it
  directly.
* ``key`` is a copy of ``exact`` taken every ``key_every`` rounds and
  published in full (``GlobalModel``).
* ``published`` is what devices rebuild and train from: the key itself on
  key rounds, otherwise ``key + decode(delta)`` with ``delta`` the downlink
  codec's encoding of ``exact - key`` (``fedge.downlink``). Updates must
  name its state digest as their base.

Because each delta is re-encoded from the exact model, the error of a lossy
downlink codec is fresh noise every round, never a drift.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fedge import tensors
from fedge.codecs import UpdateCodec, make_codec
from fedge.downlink import encode_delta, rebuild
from fedge.messages import GlobalModel, ModelDelta
from fedge.tensors import ModelArrays, TensorSpec


class ModelLineage:
    def __init__(self, *, job: str, factory: str, factory_args: dict[str, Any], initial: ModelArrays,
                 downlink: dict[str, Any], key_every: int, seed: int) -> None:
        self.job = job
        self.factory = factory
        self.factory_args = dict(factory_args)
        self.spec = TensorSpec.of(initial)
        self.downlink_params = dict(downlink)
        self.codec: UpdateCodec | None = None if downlink.get("name", "none") == "none" else make_codec(downlink)
        self.key_every = max(1, key_every)
        self.seed = seed
        self.exact: ModelArrays = {k: np.asarray(v, dtype=np.float32) for k, v in initial.items()}
        self.round = 0
        self.samples = 0
        self.delta_body = b""
        self._set_key(0, self.exact)

    # --- what devices see ------------------------------------------------------

    @property
    def digest(self) -> str:
        """State digest of the published model (what updates must build on)."""
        return self.published_digest

    def _set_key(self, round_: int, key: ModelArrays) -> None:
        self.key = {k: np.array(key[k], dtype=np.float32, copy=True) for k in self.spec.names}
        self.key_round = round_
        body = tensors.pack(self.key)  # canonical form: float32 in spec order
        self.key_message = GlobalModel(
            job=self.job, round=round_, model=self.factory, model_args=self.factory_args, spec=self.spec,
            body=body, num_samples=self.samples,
        ).encode()
        self.key_digest = hashlib.sha256(body).hexdigest()  # == tensors.state_digest(self.key), one pack fewer
        self.published, self.published_digest = self.key, self.key_digest
        self.delta_message: bytes | None = None
        self.delta_body = b""
        self.delta_params: dict[str, Any] = {}

    def _set_delta(self, round_: int, body: bytes, params: dict[str, Any]) -> None:
        self.delta_body = body
        self.delta_params = dict(params)
        self.published = rebuild(self.key, make_codec(params), body, self.spec)
        self.published_digest = tensors.state_digest(self.published, self.spec)
        self.delta_message = ModelDelta(
            job=self.job, round=round_, key_round=self.key_round, key_digest=self.key_digest,
            target_digest=self.published_digest, codec=self.delta_params, body=body,
        ).encode()

    def advance(self, round_: int, exact: ModelArrays, samples: int) -> bool:
        """Adopt the server's new model; True when a new key was cut. Raises
        (and changes nothing) when the model cannot be published, e.g. a
        delta from the key that overflows the downlink codec."""
        key_cut = self.codec is None or round_ - self.key_round >= self.key_every
        if self.codec is not None and not key_cut:
            rng = np.random.default_rng([self.seed, round_, 0xD0])
            body = encode_delta(exact, self.key, self.codec, rng)
            published = rebuild(self.key, make_codec(self.downlink_params), body, self.spec)
            if not all(np.isfinite(a).all() for a in published.values()):
                raise ValueError("the published model would not be finite")
        self.exact = exact
        self.round = round_
        self.samples = samples
        if self.codec is None or key_cut:
            self._set_key(round_, exact)
        else:
            self._set_delta(round_, body, self.downlink_params)
        return key_cut

    def exact_message(self) -> bytes:
        """The exact server model as a full model message (for export)."""
        return GlobalModel(job=self.job, round=self.round, model=self.factory, model_args=self.factory_args,
                           spec=self.spec, body=tensors.pack(self.exact), num_samples=self.samples).encode()

    # --- persistence -----------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"global/{k}": v for k, v in self.exact.items()}
        arrays.update({f"key/{k}": v for k, v in self.key.items()})
        arrays["delta_body"] = np.frombuffer(self.delta_body, dtype=np.uint8)
        meta = {"model_round": self.round, "model_samples": self.samples, "key_round": self.key_round,
                "key_digest": self.key_digest, "model_digest": self.published_digest,
                "delta_codec": self.delta_params,
                "exact_digest": tensors.state_digest(self.exact, self.spec)}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        exact = {k[len("global/"):]: v for k, v in arrays.items() if k.startswith("global/")}
        key = {k[len("key/"):]: v for k, v in arrays.items() if k.startswith("key/")}
        self.spec.check(exact, what="checkpoint")
        self.spec.check(key, what="checkpoint key")
        self.round = int(meta["model_round"])
        self.samples = int(meta.get("model_samples", 0))
        self.exact = {k: np.array(exact[k], dtype=np.float32) for k in self.spec.names}
        if tensors.state_digest(self.exact, self.spec) != meta.get("exact_digest"):
            raise ValueError("checkpoint server model does not match its digest; the file is damaged")
        self._set_key(int(meta["key_round"]), key)
        if self.key_digest != meta.get("key_digest"):
            raise ValueError("checkpoint key model does not match its digest; the file is damaged")
        body = bytes(arrays.get("delta_body", np.zeros(0, np.uint8)))
        if body:
            # Rebuilt with the codec that encoded it, even if the job's
            # downlink codec changed since; later rounds use the new one.
            self._set_delta(self.round, body, meta["delta_codec"])
        if self.published_digest != meta.get("model_digest"):
            raise ValueError("checkpoint model digest does not match its tensors; the file is damaged")
