"""Which devices the job believes: the enrolled keys (``aggregator.registry``,
re-read when the operator changes them), each message's signature, and each
device's presence.

An enrollment or a revocation takes effect within seconds, with no restart:
the registry is re-read once a second and before a message whose signer it
does not know. A revoked device that is online goes offline; a presence
refused for a key not yet enrolled is held (bounded) and taken once the
device is. A presence must be signed by the device and newer than the last
one taken from it: a forged or replayed one must not even mark a device
offline. With ``identity.signing = "off"`` there is no registry and every
well-formed message is believed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from aggregator.events import ClientStatus
from aggregator.ratelimit import RateLimiter
from aggregator.registry import Registry, RegistryError
from fedge import wire
from fedge.identity import IdentityError, check_signed
from fedge.logs import fields
from fedge.messages import ProtocolError, Status
from fedge.wire import Envelope, WireError

log = logging.getLogger("fedge.aggregator")

HELD_PRESENCES = 4096  # at most, and at most limits.max_devices


class Enrollment:
    def __init__(self, root: Path | None, max_devices: int, max_body: int) -> None:
        """``root``: the state directory that holds the registry; None when
        signing is off."""
        self.registry = Registry(root) if root is not None else None
        self.max_held = min(max_devices, HELD_PRESENCES)
        self.max_body = max_body
        self.failed = False  # the registry could not be read last time
        self.polled = 0.0
        # The latest signed presence taken from each device: (seq, its signature).
        self.presence_seq: dict[str, tuple[int, bytes]] = {}
        # Presences refused for a key not (yet) enrolled, newest last.
        self.held: dict[str, bytes] = {}
        self.enrolled_since: list[str] = []  # held presences whose devices the registry now knows
        self.revoked: list[ClientStatus] = []  # offline events for devices no longer enrolled, to feed
        self.verified: tuple[str, bytes] | None = None  # (device, signature) checked last

    @property
    def signing(self) -> bool:
        return self.registry is not None

    def current(self, online: Iterable[str], now: float) -> Registry | None:
        """The registry, re-read if the operator changed it (a revocation
        takes effect on the next message); revoked devices that are online
        are queued to go offline (``revoked``)."""
        reg = self.registry
        if reg is None:
            return None
        try:
            changed = reg.reload()
            if self.failed:
                log.warning("the device registry %s is readable again", reg.path)
            self.failed = False
        except RegistryError as exc:
            if not self.failed:
                log.error("%s; keeping the devices read before", exc)
            self.failed = True
            return reg
        if changed:
            for client in [c for c in online if reg.key_of(c) is None]:
                log.warning("%s is no longer enrolled: it takes no further part", client)
                self.revoked.append(ClientStatus(client, False, {}, now))
            self.enrolled_since = [c for c in self.held if reg.key_of(c) is not None]
        return reg

    def poll(self, online: Iterable[str], now: float) -> list[tuple[str, bytes]]:
        """Once a second: the registry re-read, so that an enrollment or a
        revocation takes effect within seconds even for a device that sends
        nothing. Returns the held presences of devices enrolled since."""
        if self.registry is None or now - self.polled < 1.0:
            return []
        self.polled = now
        self.current(online, now)
        taken, self.enrolled_since = self.enrolled_since, []
        out = []
        for client in taken:
            payload = self.held.pop(client, None)
            if payload is not None:
                log.info("%s is enrolled now: taking the presence it sent before", client,
                         extra=fields(device=client, reason="enrolled"))
                out.append((client, payload))
        return out

    def verify(self, client: str, env: Envelope, online: Iterable[str] = (), now: float = 0.0) -> None:
        """Raises ``IdentityError`` unless ``env`` is signed by ``client``'s
        enrolled key."""
        if self.verified is not None and self.verified == (client, env.signature):
            self.verified = None  # checked already (signed_by)
            return
        reg = self.current(online, now)
        assert reg is not None
        check_signed(env, reg.key_of(client), f"{env.kind.name.lower()} from {client}")

    def signed_by(self, client: str, message: bytes, online: Iterable[str], now: float) -> Envelope | None:
        """``message`` decoded, if it is signed by ``client``'s enrolled key
        (any well-formed message when signing is off); None otherwise.
        Checked before the device's rate is charged, so that an outsider
        cannot spend a real device's budget on a broker without ACL; the
        core takes the envelope and skips checking it again (``verified``),
        and decodes, checks and counts again one that failed."""
        try:
            env = wire.decode(message, max_body=self.max_body)
            if self.registry is not None:
                self.verify(client, env, online, now)
        except (WireError, IdentityError):
            return None
        self.verified = (client, env.signature)
        return env

    def presence(self, client: str, payload: bytes, now: float, online: Iterable[str],
                 incident: Callable[[str], None], log_limit: RateLimiter) -> ClientStatus | None:
        """The presence ``payload`` says, or None when it is not believed;
        ``incident(reason)`` counts what was wrong with it."""
        if not payload:
            return None if self.signing else ClientStatus(client, False, {}, now)
        try:
            env = wire.decode(payload, max_body=0)
            if self.signing:
                self.verify(client, env, online, now)
            status = Status.parse(env)
        except IdentityError as exc:
            incident(exc.reason)
            hint = ""
            if exc.reason in ("unknown_signer", "wrong_signer") and self.signing:
                self._hold(client, payload)
                hint = (f"; once enrolled (fedge enroll --config <this job's config> {client} KEY) it is taken "
                        "within seconds, with no restart")
            if log_limit.allow((client, exc.reason), now):
                log.warning("ignored presence of %s: %s%s", client, exc, hint,
                            extra=fields(device=client, reason=exc.reason))
            return None
        except (WireError, ProtocolError) as exc:
            incident("bad_status")
            log.warning("ignored status of %s: %s", client, exc, extra=fields(device=client, reason="bad_status"))
            return ClientStatus(client, False, {}, now)
        if status.sender != client:
            incident("bad_status")
            return ClientStatus(client, False, {}, now)
        return self._newer(client, status, env.signature, now, incident)

    def _hold(self, client: str, payload: bytes) -> None:
        """Held, bounded: taken as soon as the operator enrolls the device."""
        self.held.pop(client, None)
        self.held[client] = payload
        while len(self.held) > self.max_held:
            self.held.pop(next(iter(self.held)))

    def _newer(self, client: str, status: Status, signature: bytes, now: float,
               incident: Callable[[str], None]) -> ClientStatus | None:
        # An "online" must be newer than the last taken from the device: an old
        # one replayed must not bring back a device that left. An "offline"
        # is taken when signed, whatever its number: a device's last will is
        # signed when it connects, before the presence it then publishes, and
        # a live device publishes "online" again when it sees itself offline.
        if self.signing and status.state == "online":
            last, last_sig = self.presence_seq.get(client, (0, b""))
            if status.seq == last and signature == last_sig:
                return None  # the same message again (a redelivery, or retained on a new subscription)
            if status.seq <= last:
                incident("replayed_status")
                log.warning("ignored presence of %s: sequence %d is not newer than %d (a replay)", client,
                            status.seq, last, extra=fields(device=client, reason="replayed_status"))
                return None
            self.presence_seq[client] = (status.seq, signature)
        return ClientStatus(client, status.state == "online", status.info, now)
