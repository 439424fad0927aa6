"""Secure aggregation: the aggregator learns the sum of a round's updates and
nothing else about any one of them, even when devices drop out.

The protocol is SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning") in its semi-honest form, with the
SecAgg+ neighbourhood graph (Bell et al. 2020): each device shares secrets
and masks with ``degree`` neighbours instead of everyone, so its cost grows
with the degree (a few times log n), not with n. This module is the whole
protocol without I/O: ``SecAggClient`` is one device's side of one round
attempt, ``SecAggServer`` the aggregator's; the roles move their messages.

Stages, each with its own deadline on the aggregator's side:

1. **Keys.** Each selected device makes two fresh X25519 key pairs for this
   attempt (never reused: a restarted round is a new attempt with new keys):
   one to encrypt shares (``c``), one to agree pairwise masks (``s``), and
   sends the public halves. The aggregator forwards the set it received
   (U1); each device signs its keys with its device identity, so the
   aggregator cannot substitute its own.
2. **Shares.** Each device draws a self-mask seed ``b`` and splits ``b`` and
   its private mask key ``s`` into Shamir shares, ``threshold`` of its
   neighbours' shares reconstructing either, and sends each neighbour its
   share encrypted (ChaCha20-Poly1305, key from X25519 of the ``c`` keys
   through HKDF-SHA256, bound to the job, round, attempt and both ids). The
   aggregator routes them (U2: who sent shares).
3. **Masked input.** Each device in U2 sends ``y = x + PRG(b) + sum over
   neighbours v in U2 of +-PRG(s_uv)`` modulo ``2^modulus_bits``, where
   ``s_uv`` is agreed from the ``s`` keys (the device with the smaller id
   adds, the other subtracts, so pairs cancel in the sum) and PRG is the
   ChaCha20 keystream. ``x`` is the update as integers (``quantize``). U3:
   who sent one.
4. **Unmasking.** Each survivor reveals, for each neighbour, the share of
   ``b`` if that neighbour is in U3, or the share of ``s`` if it dropped
   after sharing (in U2, not U3); never both for one neighbour, and nothing
   if fewer than ``threshold`` devices are in U3. The aggregator
   reconstructs, removes the self masks of U3 and the pairwise masks that
   dropped devices left behind, and has the sum of U3's inputs.

Any number of dropouts at any stage is tolerated while every device of U3
keeps ``threshold`` surviving neighbours; below that the round fails and
nothing is revealed. Primitives all come from well-kept libraries: X25519,
HKDF, ChaCha20 and ChaCha20-Poly1305 from ``cryptography``, Shamir sharing
over GF(2^128) from PyCryptodome. This module writes only the protocol.

Security model: semi-honest aggregator (it follows the protocol but tries to
learn from what it sees), with any number of devices colluding with it up
to ``threshold - 1`` of a device's neighbours. A malicious aggregator could
lie about who dropped to learn both shares of one device from different
subsets; Bonawitz et al.'s consistency round (signatures over U3) closes
that, and the device side refuses the easy form of it (being asked for both
shares of one neighbour).
"""

from __future__ import annotations

import math
import os
import random
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedge.ddgauss import MAX_ROUNDINGS, NOISE_TAIL, discrete_gaussian, round_within, rounding_bound
from fedge.errors import OneReasonError

SEED_BYTES = 32
# What a device advertises (among its codecs) to say it can take part, and
# the codec a secure round announces and its updates echo: the body is the
# masked input, packed at the plan's modulus bits.
CAPABILITY = "secagg"
CODEC: dict[str, Any] = {"name": "secagg"}
SHARE_BYTES = 16  # PyCryptodome shares 16-byte secrets; a 32-byte secret is two of them
MAX_MODULUS_BITS = 32
MAX_DEVICES = 10_000  # in one secure round (the stage messages' id lists hold no more)
# The modulus has this many bits beyond what the honest sum needs. A masked
# input cannot be range-checked, so a device could send any integer; with the
# headroom, an unmasked sum outside the honest range exposes it (or a bad
# share: the sum is then uniform, out of range in 3 coordinates of 4), and
# what passes moves each coordinate by at most the honest range.
GUARD_BITS = 2


class SecAggError(OneReasonError):
    """A protocol step that cannot go on: a bad message, too few devices or
    shares, a request that would reveal too much, shares that do not
    combine. Names what and why."""

    default_reason = "secagg_failed"


# --- the plan ------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggPlan:
    """What a round's devices agree on, from its announcement."""

    threshold: int  # shares that reconstruct a device's secrets (t)
    degree: int  # neighbours per device (SecAgg+); n - 1 or more: every other device (SecAgg)
    bits: int  # a device's coordinate is an integer of this many bits, sign included
    bound: float  # |coordinate| is clamped to this before it is made an integer
    modulus_bits: int  # inputs and their sum live modulo 2^modulus_bits
    # Distributed DP in integers: the standard deviation of a device's
    # discrete Gaussian noise per model coordinate, and on the extra
    # coordinate that carries adaptive clipping's report (0: none).
    noise: float = 0.0
    aux_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise SecAggError("secagg threshold must be at least 2")
        if self.degree < self.threshold:
            raise SecAggError(f"secagg degree {self.degree} is below the threshold {self.threshold}")
        if self.degree > MAX_DEVICES:
            raise SecAggError(f"secagg degree {self.degree} is over {MAX_DEVICES} devices")
        if not 2 <= self.bits <= 24:
            raise SecAggError("secagg bits must be in 2..24")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise SecAggError("secagg bound must be a positive number")
        if not self.bits < self.modulus_bits <= MAX_MODULUS_BITS:
            raise SecAggError(f"secagg modulus_bits must be in {self.bits + 1}..{MAX_MODULUS_BITS}")
        for name in ("noise", "aux_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 2 ** MAX_MODULUS_BITS):
                raise SecAggError(f"secagg {name} must be a number in 0..2^{MAX_MODULUS_BITS}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"threshold": self.threshold, "degree": self.degree, "bits": self.bits,
                               "bound": self.bound, "modulus_bits": self.modulus_bits}
        if self.noise or self.aux_noise:
            out.update(noise=self.noise, aux_noise=self.aux_noise)
        return out

    @classmethod
    def from_json(cls, data: Any) -> SecAggPlan:
        if not isinstance(data, dict):
            raise SecAggError("secagg plan must be an object")
        ints = {}
        for key in ("threshold", "degree", "bits", "modulus_bits"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SecAggError(f"secagg {key} must be an integer")
            ints[key] = value
        numbers = {}
        for key, default in (("bound", None), ("noise", 0.0), ("aux_noise", 0.0)):
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SecAggError(f"secagg {key} must be a number")
            numbers[key] = float(value)
        return cls(ints["threshold"], ints["degree"], ints["bits"], numbers["bound"], ints["modulus_bits"],
                   numbers["noise"], numbers["aux_noise"])

    @classmethod
    def for_devices(cls, devices: int, threshold: int, degree: int, bits: int, bound: float, noise: float = 0.0,
                    aux_noise: float = 0.0) -> SecAggPlan:
        """The plan whose modulus holds the sum of ``devices`` inputs: each
        is at most ``peak`` in absolute value (``levels``, plus the noise cut
        at ``NOISE_TAIL`` deviations), so the sum's magnitude is at most
        ``devices x peak``; one more bit holds its sign, and ``GUARD_BITS``
        more expose a sum that no honest inputs make."""
        levels = 2 ** (bits - 1) - 1
        peak = levels + math.ceil(NOISE_TAIL * max(noise, aux_noise))
        modulus_bits = max(bits + 1, math.ceil(math.log2(devices * peak + 1)) + 1) + GUARD_BITS
        if modulus_bits > MAX_MODULUS_BITS:
            raise SecAggError(f"{devices} devices at {bits} bits need a {modulus_bits}-bit modulus, over "
                              f"{MAX_MODULUS_BITS}: lower secagg.bits")
        return cls(threshold, degree, bits, bound, modulus_bits, noise, aux_noise)

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def peak(self) -> int:
        """The largest magnitude of one input's coordinate (noise included)."""
        return self.levels + math.ceil(NOISE_TAIL * max(self.noise, self.aux_noise))

    @property
    def scale(self) -> float:
        return self.levels / self.bound

    @property
    def mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    def capacity(self) -> int:
        """The most inputs whose sum cannot wrap."""
        return ((1 << (self.modulus_bits - 1)) - 1) // self.peak

    def check_sum(self, total: np.ndarray, inputs: int) -> None:
        """Raise ``SecAggError`` unless every coordinate of an unmasked sum
        of ``inputs`` inputs is within what honest inputs can make."""
        t = np.asarray(total, dtype=np.int64) & self.mask
        signed = np.where(t >= 1 << (self.modulus_bits - 1), t - (1 << self.modulus_bits), t)
        worst = int(np.abs(signed).max(initial=0))
        if worst > inputs * self.peak:
            raise SecAggError(f"the unmasked sum of {inputs} inputs reaches {worst}, beyond the {inputs * self.peak} "
                              f"honest inputs can: a device sent a masked input or a share not made by the protocol")


# --- integers ------------------------------------------------------------------


def quantize(flat: np.ndarray, plan: SecAggPlan, rng: np.random.Generator) -> np.ndarray:
    """A float vector as integers modulo ``2^modulus_bits`` (uint32): clamped
    to ``+-bound``, scaled so that ``bound`` is ``levels``, rounded
    stochastically (unbiased: the rounding adds variance at most
    ``1 / (4 scale^2)`` per coordinate, never bias)."""
    x = np.clip(np.asarray(flat, dtype=np.float64), -plan.bound, plan.bound) * plan.scale
    q = np.floor(x + rng.random(x.shape))
    q = np.clip(q, -plan.levels, plan.levels).astype(np.int64)
    return (q & plan.mask).astype(np.uint32)


def flatten(arrays: Mapping[str, np.ndarray], names: Iterable[str]) -> np.ndarray:
    """Named tensors as one float64 vector, in ``names`` order (the model's)."""
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names])


def unflatten(flat: np.ndarray, entries: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The inverse of ``flatten``: float32 tensors of the given shapes."""
    out, at = {}, 0
    for name, shape in entries:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = np.asarray(flat[at:at + size], dtype=np.float32).reshape(shape)
        at += size
    if at != len(flat):
        raise SecAggError(f"a flat vector of {len(flat)} values does not fit a model of {at}")
    return out


def quantize_noisy(flat: np.ndarray, plan: SecAggPlan, rng: np.random.Generator, model: int) -> np.ndarray:
    """Distributed DP in integers (DDGauss): the first ``model`` coordinates
    (an update clipped to ``plan.bound`` in L2) are rounded conditionally,
    so that their norm stays within ``rounding_bound``, and get this
    device's discrete Gaussian share ``plan.noise``; the coordinates after
    them (adaptive clipping's report) are rounded and get ``aux_noise``.
    Sums of such shares stay discrete Gaussian to within a distance the
    record states (``fedge.ddgauss.tau``), so the sum is as private as the
    Gaussian mechanism at the noise it carries. Modulo ``2^modulus_bits``."""
    x = np.clip(np.asarray(flat, dtype=np.float64), -plan.bound, plan.bound) * plan.scale
    head, rest = x[:model], x[model:]
    q = round_within(head, rounding_bound(plan.levels, model), rng)
    if q is None:
        raise SecAggError(f"no rounding of the update within its norm bound in {MAX_ROUNDINGS} draws "
                          f"(was it clipped to {plan.bound:g}?)")
    q = q + discrete_gaussian(plan.noise, model, rng)
    aux = np.floor(rest + rng.random(rest.shape)).astype(np.int64) + discrete_gaussian(plan.aux_noise, len(rest), rng)
    return (np.concatenate([q, aux]) & plan.mask).astype(np.uint32)


def dequantize(total: np.ndarray, plan: SecAggPlan) -> np.ndarray:
    """The sum of quantized inputs (modulo ``2^modulus_bits``) back to floats."""
    t = np.asarray(total, dtype=np.int64) & plan.mask
    signed = np.where(t >= 1 << (plan.modulus_bits - 1), t - (1 << plan.modulus_bits), t)
    return (signed / plan.scale).astype(np.float32)


def pack(values: np.ndarray, bits: int) -> bytes:
    """uint32 values below ``2^bits``, ``bits`` each, little-endian bit order:
    masked inputs look uniform, so only their width can be saved."""
    v = np.ascontiguousarray(values, dtype="<u4")
    unpacked = np.unpackbits(v.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
    return np.packbits(unpacked.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    need = (count * bits + 7) // 8
    if len(data) != need:
        raise SecAggError(f"a masked input of {count} values at {bits} bits is {need} bytes, not {len(data)}")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    rows = np.zeros((count, 32), dtype=np.uint8)
    rows[:, :bits] = flat.reshape(count, bits)
    return np.packbits(rows, axis=1, bitorder="little").view("<u4").reshape(-1).astype(np.uint32)


def prg(seed: bytes, count: int, plan: SecAggPlan) -> np.ndarray:
    """``count`` pseudo-random values below ``2^modulus_bits``: the ChaCha20
    keystream under ``seed`` (each seed is used once: fresh per attempt)."""
    if len(seed) != SEED_BYTES:
        raise SecAggError("a mask seed is 32 bytes")
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(bytes(4 * count))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32) & np.uint32(plan.mask)


# --- the neighbourhood graph ---------------------------------------------------


def neighbours(ids: Iterable[str], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """SecAgg+'s graph over ``ids``: a ring in an order drawn from the public
    ``seed``, each device joined to ``degree // 2`` on each side (plus one
    more ahead for an odd degree); everyone when ``degree >= n - 1``. The
    same ids and seed give every device the same graph."""
    order = sorted(set(ids))
    n = len(order)
    if degree >= n - 1:
        return {u: tuple(v for v in order if v != u) for u in order}
    random.Random(seed).shuffle(order)
    pos = {u: i for i, u in enumerate(order)}
    ahead, behind = (degree + 1) // 2, degree // 2
    out: dict[str, set[str]] = {u: set() for u in order}
    for u in order:
        i = pos[u]
        for d in range(1, ahead + 1):
            v = order[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
        for d in range(1, behind + 1):
            v = order[(i - d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: tuple(sorted(vs)) for u, vs in out.items()}


# --- keys and encryption ---------------------------------------------------------


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public(raw: bytes, who: str) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise SecAggError(f"{who}'s public key is not 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def _derive(shared: bytes, purpose: bytes, context: bytes, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    info = b"fedge-secagg/" + purpose + b"/" + context + b"/" + low.encode() + b"\0" + high.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret: holder i (1-based) gets 32 bytes
    (its share of each 16-byte half)."""
    from Crypto.Protocol.SecretSharing import Shamir

    lo = Shamir.split(threshold, holders, secret[:SHARE_BYTES])
    hi = Shamir.split(threshold, holders, secret[SHARE_BYTES:])
    return [a[1] + b[1] for a, b in zip(lo, hi, strict=True)]


def _combine(shares: Mapping[int, bytes]) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir

    try:
        lo = Shamir.combine([(i, s[:SHARE_BYTES]) for i, s in shares.items()])
        hi = Shamir.combine([(i, s[SHARE_BYTES:]) for i, s in shares.items()])
    except (ValueError, TypeError) as exc:  # PyCryptodome's: shares of unequal length, repeated holders, ...
        raise SecAggError(f"the revealed shares do not combine: {exc}") from exc
    return bytes(lo) + bytes(hi)


@dataclass(frozen=True)
class Context:
    """What every key derivation and ciphertext is bound to."""

    job: str
    round: int
    attempt: int

    def encode(self) -> bytes:
        return f"{self.job}/{self.round}/{self.attempt}".encode()

    def graph_seed(self) -> bytes:
        return b"fedge-secagg-graph/" + self.encode()


_SHARE_PLAIN = struct.Struct("<H32s32s")  # share index, share of s, share of b
SEALED_BYTES = 12 + _SHARE_PLAIN.size + 16  # nonce, the share, Poly1305's tag


# --- a device ----------------------------------------------------------------------


class SecAggClient:
    """One device's side of one round attempt. Its secrets live only here:
    a new attempt is a new client with new keys and seeds."""

    def __init__(self, me: str, plan: SecAggPlan, context: Context) -> None:
        self.me = me
        self.plan = plan
        self.context = context
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = os.urandom(SEED_BYTES)
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.graph: tuple[str, ...] = ()
        self.held: dict[str, tuple[int, bytes, bytes]] = {}  # neighbour -> (index, share of s, share of b)
        self.sharers: frozenset[str] = frozenset()  # U2 as the aggregator announced it
        self.sent_input = False
        self.revealed = False

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: (encryption key, mask key), public halves."""
        return _raw_public(self._c), _raw_public(self._s)

    def share(self, keys: Mapping[str, tuple[bytes, bytes]], devices: Iterable[str] | None = None
              ) -> dict[str, bytes]:
        """Stage 2: from the key set U1 (``devices``, default: the ids of
        ``keys``) and at least its neighbours' keys, an encrypted share for
        each neighbour."""
        ids = set(keys if devices is None else devices)
        if self.me not in ids or keys.get(self.me, self.advertise()) != self.advertise():
            raise SecAggError("the key set does not hold this device's own keys")
        graph = neighbours(ids, self.plan.degree, self.context.graph_seed())[self.me]
        missing = [v for v in graph if v not in keys]
        if missing:
            raise SecAggError(f"no keys for neighbour {missing[0]}")
        parsed = {v: (_public(keys[v][0], v), _public(keys[v][1], v)) for v in graph}
        if len(graph) + 1 < self.plan.threshold:
            raise SecAggError(f"{len(graph)} neighbours answered: with this device, fewer than the threshold "
                              f"{self.plan.threshold}")
        self.keys = {v: (bytes(keys[v][0]), bytes(keys[v][1])) for v in graph}
        self.graph = graph
        # The holders are the neighbours and the device itself (as in
        # SecAgg, where every user holds a share of its own secrets): its
        # own share of b counts when it survives, and of s it is never
        # asked (s is revealed only for a device that dropped).
        holders = (self.me, *graph)
        s_shares = _split(_raw_private(self._s), self.plan.threshold, len(holders))
        b_shares = _split(self._b, self.plan.threshold, len(holders))
        self.held[self.me] = (1, s_shares[0], b_shares[0])
        out = {}
        for i, v in enumerate(graph, start=1):
            plain = _SHARE_PLAIN.pack(i + 1, s_shares[i], b_shares[i])
            out[v] = self._seal(v, parsed[v][0], plain)
        return out

    def masked_input(self, x: np.ndarray, shares: Mapping[str, bytes], sharers: Iterable[str]) -> np.ndarray:
        """Stage 3: keep the shares neighbours sent (U2: ``sharers``), and mask
        ``x`` (uint32 values below ``2^modulus_bits``)."""
        sharers = frozenset(sharers)
        if self.me not in sharers:
            raise SecAggError("this device is not among the devices that shared")
        for u, blob in shares.items():
            if u not in self.graph or u not in sharers:
                raise SecAggError(f"a share from {u}, which is not a neighbour that shared")
            index, s_share, b_share = _SHARE_PLAIN.unpack(self._open(u, _public(self.keys[u][0], u), blob))
            if not 2 <= index <= len(self.graph) + 1:
                raise SecAggError(f"{u}'s share has index {index}")
            self.held[u] = (index, s_share, b_share)
        self.sharers = sharers
        y = np.asarray(x, dtype=np.uint32).copy()
        count = y.size
        y += prg(self._b, count, self.plan)
        for v in self.graph:
            if v not in sharers:
                continue
            seed = _derive(self._s.exchange(_public(self.keys[v][1], v)), b"mask", self.context.encode(), self.me, v)
            if self.me < v:
                y += prg(seed, count, self.plan)
            else:
                y -= prg(seed, count, self.plan)
        self.sent_input = True
        return y & np.uint32(self.plan.mask)

    def unmask(self, survivors: Iterable[str]) -> dict[str, tuple[str, int, bytes]]:
        """Stage 4: for each neighbour that shared, (``"b"`` or ``"s"``, share
        index, share): ``b`` for one in U3 (``survivors``), ``s`` for one that
        dropped after sharing. Refused if U3 is below the threshold, or
        names a device that did not share."""
        survivors = frozenset(survivors)
        if len(survivors) < self.plan.threshold:
            raise SecAggError(f"{len(survivors)} devices sent masked inputs, fewer than the threshold "
                              f"{self.plan.threshold}: nothing is revealed")
        if not survivors <= self.sharers:
            raise SecAggError("the survivors name a device that did not share")
        if self.revealed:
            raise SecAggError("this device already revealed its shares for this attempt")
        self.revealed = True
        out = {}
        for u, (index, s_share, b_share) in self.held.items():
            if u not in self.sharers:
                continue
            out[u] = ("b", index, b_share) if u in survivors else ("s", index, s_share)
        return out

    def _seal(self, peer: str, key: X25519PublicKey, plain: bytes) -> bytes:
        aead = ChaCha20Poly1305(_derive(self._c.exchange(key), b"share", self.context.encode(), self.me, peer))
        nonce = os.urandom(12)
        return nonce + aead.encrypt(nonce, plain, self._ad(self.me, peer))

    def _open(self, peer: str, key: X25519PublicKey, blob: bytes) -> bytes:
        aead = ChaCha20Poly1305(_derive(self._c.exchange(key), b"share", self.context.encode(), self.me, peer))
        try:
            return aead.decrypt(blob[:12], blob[12:], self._ad(peer, self.me))
        except (InvalidTag, ValueError):
            raise SecAggError(f"the share from {peer} does not decrypt (tampered, or not for this device)") from None

    def _ad(self, sender: str, receiver: str) -> bytes:
        return self.context.encode() + b"/" + sender.encode() + b"\0" + receiver.encode()


# --- the aggregator ------------------------------------------------------------------


class SecAggServer:
    """The aggregator's side of one round attempt: it sees public keys,
    ciphertexts it cannot open, masked inputs and, at the end, just enough
    shares to remove the masks from the sum."""

    def __init__(self, plan: SecAggPlan, context: Context, count: int) -> None:
        self.plan = plan
        self.context = context
        self.count = count  # coordinates per input
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.graph: dict[str, tuple[str, ...]] = {}
        self.routed: dict[str, dict[str, bytes]] = {}  # receiver -> sender -> ciphertext
        self.sharers: set[str] = set()
        self.total = np.zeros(count, dtype=np.uint32)
        self.survivors: set[str] = set()
        self.revealed: dict[str, dict[str, tuple[str, int, bytes]]] = {}

    # stage 1
    def add_keys(self, device: str, c_pk: bytes, s_pk: bytes) -> None:
        _public(c_pk, device), _public(s_pk, device)
        if device in self.keys and self.keys[device] != (c_pk, s_pk):
            raise SecAggError(f"{device} sent other keys for the same attempt")
        self.keys[device] = (bytes(c_pk), bytes(s_pk))

    def key_set(self) -> dict[str, tuple[bytes, bytes]]:
        """U1, to forward to every device in it; fixes the graph."""
        if len(self.keys) < self.plan.threshold:
            raise SecAggError(f"{len(self.keys)} devices sent keys, fewer than the threshold {self.plan.threshold}")
        self.graph = neighbours(self.keys, self.plan.degree, self.context.graph_seed())
        return dict(self.keys)

    # stage 2
    def add_shares(self, device: str, shares: Mapping[str, bytes]) -> None:
        if device not in self.graph:
            raise SecAggError(f"shares from {device}, which is not in the key set")
        if set(shares) != set(self.graph[device]):
            raise SecAggError(f"{device} sent shares for other devices than its neighbours")
        for v, blob in shares.items():
            self.routed.setdefault(v, {})[device] = bytes(blob)
        self.sharers.add(device)

    def shares_for(self, device: str) -> dict[str, bytes]:
        """The ciphertexts for ``device`` from neighbours in U2."""
        return {u: b for u, b in self.routed.get(device, {}).items() if u in self.sharers}

    # stage 3
    def add_input(self, device: str, y: np.ndarray) -> None:
        if device not in self.sharers:
            raise SecAggError(f"a masked input from {device}, which did not share")
        if device in self.survivors:
            raise SecAggError(f"a second masked input from {device}")
        y = np.asarray(y, dtype=np.uint32)
        if y.shape != (self.count,) or int(y.max(initial=0)) > self.plan.mask:
            raise SecAggError(f"{device}'s masked input is not {self.count} values below 2^{self.plan.modulus_bits}")
        self.total += y  # uint32 wraps modulo 2^32, a multiple of the modulus
        self.survivors.add(device)

    # stage 4
    def add_reveal(self, device: str, shares: Mapping[str, tuple[str, int, bytes]]) -> None:
        if device not in self.survivors:
            raise SecAggError(f"shares revealed by {device}, which sent no masked input")
        for u, (kind, _index, _share) in shares.items():
            want = "b" if u in self.survivors else "s"
            mine = u == device or u in self.graph.get(device, ())
            if not mine or u not in self.sharers or kind != want:
                raise SecAggError(f"{device} revealed a {kind!r} share of {u}, not what the round needs")
        self.revealed[device] = dict(shares)

    def ready(self) -> bool:
        """Whether every mask can be removed with what was revealed."""
        try:
            self._needed()
        except SecAggError:
            return False
        return True

    def _needed(self) -> dict[str, dict[int, bytes]]:
        if len(self.survivors) < self.plan.threshold:
            raise SecAggError(f"{len(self.survivors)} masked inputs, fewer than the threshold {self.plan.threshold}")
        pooled: dict[str, dict[int, bytes]] = {u: {} for u in self.sharers}
        for shares in self.revealed.values():
            for u, (_kind, index, share) in shares.items():
                pooled[u][index] = share
        short = [u for u, got in pooled.items() if len(got) < self.plan.threshold]
        if short:
            raise SecAggError(f"too few shares to unmask {len(short)} device(s), e.g. {short[0]} "
                              f"({len(pooled[short[0]])} of {self.plan.threshold})")
        return pooled

    def result(self) -> np.ndarray:
        """The sum of the survivors' inputs, modulo ``2^modulus_bits``."""
        pooled = self._needed()
        total = self.total.copy()
        for u in self.survivors:
            total -= prg(_combine(dict(list(pooled[u].items())[: self.plan.threshold])), self.count, self.plan)
        for u in self.sharers - self.survivors:  # shared, then dropped: its pairwise masks stay in the sum
            key = X25519PrivateKey.from_private_bytes(
                _combine(dict(list(pooled[u].items())[: self.plan.threshold])))
            if _raw_public(key) != self.keys[u][1]:
                raise SecAggError(f"the shares of {u}'s mask key do not rebuild it")
            for v in self.graph[u]:
                if v not in self.survivors:
                    continue
                seed = _derive(key.exchange(_public(self.keys[v][1], v)), b"mask", self.context.encode(), u, v)
                # v added +PRG if v < u, else -PRG: undo it
                if v < u:
                    total -= prg(seed, self.count, self.plan)
                else:
                    total += prg(seed, self.count, self.plan)
        total &= np.uint32(self.plan.mask)
        self.plan.check_sum(total, len(self.survivors))
        return total
