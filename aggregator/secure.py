"""The aggregator's side of one securely aggregated round attempt, without
I/O: which stage it is in, when each stage ends, what to send each device.

``SecureRound`` wraps ``fedge.secagg.SecAggServer`` (the cryptography) with
the round's timing: every stage ends when every device it waits for has
answered, or at its deadline, whichever comes first, so that a device that
drops out never stalls the round (the protocol tolerates it while each
survivor keeps ``threshold`` surviving neighbours).

* ``keys``: waits for the selected devices' public keys; then each device
  in U1 gets the id list U1 and its neighbours' keys (``keyset``).
* ``shares``: waits for U1's sealed shares; then each device in U2 gets the
  shares addressed to it and the list U2 (``routed``).
* ``inputs``: waits for U2's masked inputs (they come with the round's
  updates, after training: this stage ends with the round's own deadline);
  then each device in U3 gets the list U3 (``survivors``).
* ``unmask``: waits for U3's revealed shares; then the sum is known, or the
  round fails (too few shares) and nothing is revealed.

Anything a device sends out of turn, twice, or that the protocol refuses is
a ``refusal`` with a reason; it never raises out of here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.config import SecAggSection, configured, configured_keys
from aggregator.pipeline import Partial
from fedge.ddgauss import tau as ddgauss_tau
from fedge.messages import SecAggStage
from fedge.secagg import Context, SecAggError, SecAggPlan, SecAggServer, dequantize, unpack
from fedge.tensors import ModelArrays

if TYPE_CHECKING:
    from aggregator.robust import Defences

log = logging.getLogger("fedge.aggregator")

STAGES = ("keys", "shares", "inputs", "unmask", "done", "failed")


@dataclass(frozen=True, kw_only=True)
class SecAggPolicy:
    """The job's secure aggregation settings (``[secagg]`` keys, their
    defaults included); each round's ``SecAggPlan`` is made from them for
    the devices it selected."""

    threshold: int = configured("secagg", "threshold")  # 0: a majority of a device's share holders
    degree: int = configured("secagg", "degree")  # 0: min(n - 1, 2 ceil(log2 n) + 2)
    bits: int = configured("secagg", "bits")
    bound: float = configured("secagg", "bound")  # 0: the privacy clip of the round
    stage_s: float = configured("secagg", "stage_s")

    @classmethod
    def from_config(cls, section: SecAggSection) -> SecAggPolicy | None:
        if section.mode == "off":
            return None
        return cls(**{name: getattr(section, key) for name, (_, key) in configured_keys(cls).items()})

    def plan(self, n: int, clip: float, noise: float = 0.0, aux_noise: float = 0.0) -> SecAggPlan:
        """The plan for a round of ``n`` selected devices (``clip``: the
        round's privacy clip, 0 without privacy; ``noise``, ``aux_noise``:
        each device's integer noise, distributed privacy). Raises
        ``SecAggError`` when ``n`` devices are too few for it."""
        if n < 3:
            raise SecAggError(f"{n} selected devices are too few for secure aggregation (3 at least)")
        degree = self.degree or (n - 1 if n <= 10 else 2 * math.ceil(math.log2(n)) + 2)
        degree = min(degree, n - 1)
        threshold = self.threshold or (degree + 1) // 2 + 1
        threshold = min(threshold, degree)
        return SecAggPlan.for_devices(n, threshold, degree, self.bits, self.bound or clip, noise, aux_noise)


@dataclass
class SecureRound:
    job: str
    round: int
    attempt: int
    selected: tuple[str, ...]
    plan: SecAggPlan
    count: int  # coordinates in a masked input
    stage_s: float  # how long the keys, shares and unmask stages may take
    now: float
    stage: str = "keys"
    deadline: float = 0.0
    failure: str = ""
    refusals: dict[str, int] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)  # went offline: no stage waits for them

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.plan, Context(self.job, self.round, self.attempt), self.count)
        self.deadline = self.now + self.stage_s

    @property
    def context(self) -> Context:
        return self.server.context

    @staticmethod
    def context_for(job: str, round_: int, attempt: int) -> Context:
        return Context(job, round_, attempt)

    # --- what devices send -----------------------------------------------------

    def on_stage(self, client: str, msg: SecAggStage) -> str | None:
        """A device's keys, shares or revealed shares. Returns None when
        taken, else the reason it was refused."""
        if (msg.job, msg.round, msg.attempt, msg.client) != (self.job, self.round, self.attempt, client):
            return self._refuse("secagg_wrong_round")
        if client not in self.selected:
            return self._refuse("secagg_not_selected")
        want = {"keys": "keys", "shares": "shares", "reveal": "unmask"}.get(msg.stage)
        if want != self.stage:
            return self._refuse("secagg_out_of_turn")
        try:
            if msg.stage == "keys":
                if msg.ids != (client,):
                    raise SecAggError("keys name another device")
                blob = msg.blobs[0]
                self.server.add_keys(client, blob[:32], blob[32:])
            elif msg.stage == "shares":
                if client in self.server.sharers:
                    return self._refuse("secagg_duplicate")
                self.server.add_shares(client, dict(zip(msg.ids, msg.blobs, strict=True)))
            else:
                if client in self.server.revealed:
                    return self._refuse("secagg_duplicate")
                self.server.add_reveal(client, {u: (msg.kinds[i], msg.indices[i], msg.blobs[i])
                                                for i, u in enumerate(msg.ids)})
        except SecAggError as exc:
            log.warning("secagg round %d: %s: %s", self.round, client, exc)
            return self._refuse("secagg_refused")
        return None

    def on_input(self, client: str, body: bytes) -> str | None:
        """A device's masked input (an update's body). None when taken."""
        if self.stage != "inputs":
            return self._refuse("secagg_out_of_turn")
        if client in self.server.survivors:
            return self._refuse("secagg_duplicate")
        try:
            self.server.add_input(client, unpack(body, self.count, self.plan.modulus_bits))
        except SecAggError as exc:
            log.warning("secagg round %d: %s: %s", self.round, client, exc)
            return self._refuse("secagg_refused")
        return None

    # --- time --------------------------------------------------------------------

    def waiting_for(self) -> set[str]:
        """Who the current stage still waits for (not devices gone offline;
        unmasking stops waiting once the shares in hand remove every mask)."""
        s = self.server
        if self.stage == "keys":
            return set(self.selected) - set(s.keys) - self.absent
        if self.stage == "shares":
            return set(s.keys) - s.sharers - self.absent
        if self.stage == "inputs":
            return s.sharers - s.survivors - self.absent
        if self.stage == "unmask":
            return set() if s.ready() else s.survivors - set(s.revealed) - self.absent
        return set()

    def out_of_round(self) -> set[str]:
        """Selected devices that can no longer add to this attempt's sum:
        they sent no keys, or no shares, before that stage ended."""
        s = self.server
        if self.stage == "keys":
            return set()
        if self.stage == "shares":
            return set(self.selected) - set(s.keys)
        return set(self.selected) - s.sharers

    def fail(self, why: str) -> None:
        if self.stage not in ("done", "failed"):
            self.stage, self.failure = "failed", why
            log.error("secagg round %d attempt %d failed: %s", self.round, self.attempt, why)

    def advance(self, now: float, inputs_closed: bool = False) -> list[SecAggStage]:
        """End the current stage if everyone answered or its deadline passed
        (the inputs stage ends only when the round says so: ``inputs_closed``);
        returns the messages for the next one."""
        out: list[SecAggStage] = []
        while self.stage not in ("done", "failed"):
            if self.stage == "inputs":
                if not (inputs_closed or not self.waiting_for()):
                    break
            elif self.waiting_for() and now < self.deadline:
                break
            step = self._next(now)
            if step is None:
                break
            out += step
        return out

    def _next(self, now: float) -> list[SecAggStage] | None:
        s = self.server
        self.deadline = now + self.stage_s
        try:
            if self.stage == "keys":
                keys = s.key_set()
                self.stage = "shares"
                return [SecAggStage(self.job, self.round, self.attempt, u, "keyset", tuple(s.graph[u]),
                                    tuple(b"".join(keys[v]) for v in s.graph[u]), peers=tuple(sorted(keys)))
                        for u in sorted(keys)]
            if self.stage == "shares":
                if len(s.sharers) < self.plan.threshold:
                    raise SecAggError(f"{len(s.sharers)} devices shared, fewer than the threshold "
                                      f"{self.plan.threshold}")
                self.stage = "inputs"
                sharers = tuple(sorted(s.sharers))
                out = []
                for u in sharers:
                    routed = s.shares_for(u)
                    out.append(SecAggStage(self.job, self.round, self.attempt, u, "routed", tuple(routed),
                                           tuple(routed.values()), peers=sharers))
                return out
            if self.stage == "inputs":
                if len(s.survivors) < self.plan.threshold:
                    raise SecAggError(f"{len(s.survivors)} masked inputs, fewer than the threshold "
                                      f"{self.plan.threshold}")
                self.stage = "unmask"
                survivors = tuple(sorted(s.survivors))
                return [SecAggStage(self.job, self.round, self.attempt, u, "survivors", peers=survivors)
                        for u in survivors]
            if self.stage == "unmask":
                if not s.ready():
                    raise SecAggError("too few shares were revealed to remove the masks")
                self.stage = "done"
                return []
        except SecAggError as exc:
            self.stage, self.failure = "failed", str(exc)
            log.error("secagg round %d attempt %d failed: %s", self.round, self.attempt, exc)
            return []
        return None

    def result(self) -> np.ndarray:
        """The sum of U3's inputs modulo 2^modulus_bits (stage ``done``)."""
        if self.stage != "done":
            raise SecAggError(f"the sum is not known (stage {self.stage})")
        return self.server.result()

    def _refuse(self, reason: str) -> str:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return reason


def warn_unseen_defences(d: Defences) -> None:
    """Secure aggregation hides every update: say which configured
    defences cannot run."""
    if d.rule == "mean" and (d.clip != "off" or d.direction != "off" or d.weight_cap != 0):
        log.warning("secure aggregation: the aggregator sees only each round's sum, so the per-update "
                    "defences (server.clip, weight_cap, direction) do not run; every coordinate of an update "
                    "is bounded by secagg.bound and every update weighs one")


# --- what a secure round adds up to ---------------------------------------------------


def secure_partial(sec: SecureRound | None, failure: str, entries: tuple[tuple[str, tuple[int, ...]], ...],
                   num_samples: int, clip: float | None = None, bit: bool = False) -> Partial:
    """The attempt's unmasked sum as a partial: every survivor's update
    weighs one; the sum is exact (float64) until it is divided. ``clip``:
    a private round's clip (its partial is released with noise even when
    secure aggregation failed: the sum is then zeros, nobody's); ``bit``:
    the masked inputs end with adaptive clipping's report. Raises
    ``SecAggError`` when there is no sum and no privacy."""
    n = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in entries)
    total: np.ndarray = np.zeros(n + (1 if bit else 0))
    used: tuple[str, ...] = ()
    if sec is not None and sec.stage == "done":
        total = dequantize(sec.result(), sec.plan).astype(np.float64)
        used = tuple(sorted(sec.server.survivors))
    elif clip is None:
        raise SecAggError(sec.failure if sec is not None else failure)
    bits = float(total[n]) / sec.plan.bound if sec is not None and bit and used else 0.0
    # The devices clipped their updates, which no one can check (each
    # coordinate was clamped to secagg.bound: not a norm bound).
    return Partial(sum=_shaped(total[:n], entries), weight=float(len(used)), used=used, bound=clip,
                   median_samples=float(num_samples) / max(len(used), 1), bits=bits)


def _shaped(flat: np.ndarray, entries: tuple[tuple[str, tuple[int, ...]], ...]) -> ModelArrays:
    """A flat vector as the model's tensors, in its own dtype."""
    out, at = {}, 0
    for name, shape in entries:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[at:at + size].reshape(shape)
        at += size
    return out


def secure_summary(sec: SecureRound | None, failure: str) -> dict[str, Any]:
    """What secure aggregation did this attempt, for the round's record
    (``failure``: why it could not start, when ``sec`` is None)."""
    if sec is None:
        return {"stage": "failed", "failure": failure}
    s = sec.server
    out: dict[str, Any] = {"stage": sec.stage, "keys": len(s.keys), "shared": len(s.sharers),
                           "inputs": len(s.survivors), "revealed": len(s.revealed),
                           "threshold": sec.plan.threshold, "degree": sec.plan.degree,
                           "modulus_bits": sec.plan.modulus_bits}
    if sec.failure:
        out["failure"] = sec.failure
    if sec.refusals:
        out["refused"] = dict(sec.refusals)
    if sec.plan.noise:
        out["integer_noise"] = float(f"{sec.plan.noise:.6g}")
        out["ddgauss_tau"] = float(f"{ddgauss_tau(sec.plan.noise, len(s.survivors)):.3g}")
    return out
