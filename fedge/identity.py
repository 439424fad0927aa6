"""Who sent a message: Ed25519 identities for devices and the aggregator.

A payload's SHA-256 (``fedge.wire``) proves it arrived intact; a signature
proves who made it. Every device and the aggregator hold an Ed25519 key
pair made where it is used (``fedge keys new``); the private key never
leaves that file (PKCS#8 PEM, mode 0600). Public keys travel as text,
``ed25519:<43 base64url characters>``, short enough to paste into a config
file or an enrollment command.

What is signed is the envelope's digest, under a context string, so a
signature over a fedge message can never be taken for one over anything
else. The digest covers the preamble (kind, lengths, the "signed" flag), the
header and the body, so the signature binds every header field: job, round,
attempt, sender, the aggregator's session and sequence number.

The primitives are the ``cryptography`` package's; nothing here is
hand-rolled.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.errors import OneReasonError
from fedge.wire import Envelope

CONTEXT = b"fedge-signature-v1\x00"
PREFIX = "ed25519:"
SIGNING_MODES = ("required", "off")  # the [identity] signing setting of both roles
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(OneReasonError):
    """A key that cannot be used, or a signature that does not verify."""

    default_reason = "bad_signature"


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_KEY_BYTES:
            raise IdentityError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(self.raw)}")

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse ``ed25519:<base64url>`` (the form ``fedge keys`` prints)."""
        text = text.strip()
        if not text.startswith(PREFIX):
            raise IdentityError(f"a public key looks like {PREFIX}<43 characters>, not {text[:20]!r}...")
        body = text[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, TypeError):
            raise IdentityError("the public key is not valid base64url") from None
        return cls(raw)

    def to_text(self) -> str:
        return PREFIX + base64.urlsafe_b64encode(self.raw).rstrip(b"=").decode()

    @property
    def fingerprint(self) -> str:
        """Short id for logs: the first 16 hex digits of the key's SHA-256."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, digest: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, CONTEXT + digest)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return self.to_text()


class Identity:
    """A private key, in memory for as long as the process signs with it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_raw(self) -> bytes:
        return self.public.raw

    def sign(self, digest: bytes) -> bytes:
        return self._key.sign(CONTEXT + digest)

    def save(self, path: Path) -> None:
        """Write the private key to a new file readable by its owner only;
        never overwrites one."""
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"{path} already exists; keys are never overwritten (remove it first)") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a private key written by ``save``; refuses a file that others
        can read."""
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except FileNotFoundError:
            raise IdentityError(f"no key file at {path}: create one with `fedge keys new --out {path}`") from None
        except OSError as exc:
            raise IdentityError(f"cannot read the key file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"{path} can be read by others (mode {stat.S_IMODE(mode):o}); "
                                f"run `chmod 600 {path}`")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise IdentityError(f"{path} is not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)


def read_public_key(text_or_path: str) -> PublicKey:
    """A public key given as text (``ed25519:...``) or as a file holding it."""
    if text_or_path.strip().startswith(PREFIX):
        return PublicKey.from_text(text_or_path)
    path = Path(text_or_path)
    try:
        return PublicKey.from_text(path.read_text())
    except FileNotFoundError:
        raise IdentityError(f"{text_or_path!r} is neither a public key ({PREFIX}...) nor a file") from None


# --- rotation of the aggregator's key ---------------------------------------------


def next_key_path(path: Path) -> Path:
    """Where ``fedge keys rotate`` leaves the successor of the key in ``path``."""
    return path.with_name(path.name + ".next")


def link_digest(job: str, old: PublicKey, new: PublicKey) -> bytes:
    """What the old key signs to hand a job over to the new one."""
    return hashlib.sha256(b"fedge-key-rotation-v1\x00" + job.encode() + b"\x00" + old.raw + new.raw).digest()


def sign_link(job: str, old: Identity, new: PublicKey) -> tuple[str, str, str]:
    """(old, new, signature) as text, for a ``messages.KeyLink``."""
    sig = old.sign(link_digest(job, old.public, new))
    return old.public.to_text(), new.to_text(), base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def follow_chain(job: str, pinned: PublicKey, links: list[tuple[str, str, str]]) -> PublicKey:
    """The key ``pinned`` hands over to, link by link: each link whose old
    key is the current one and whose signature that key made moves it on;
    any other link (another chain, a forgery) is passed over."""
    current = pinned
    for old_text, new_text, sig_text in links:
        try:
            old, new = PublicKey.from_text(old_text), PublicKey.from_text(new_text)
            sig = base64.urlsafe_b64decode(sig_text + "=" * (-len(sig_text) % 4))
        except (IdentityError, ValueError):
            continue
        if old == current and len(sig) == SIGNATURE_BYTES and old.verify(link_digest(job, old, new), sig):
            current = new
    return current


def check_signed(env: Envelope, key: PublicKey | None, what: str) -> None:
    """Refuse ``env`` unless ``key`` signed it. Raises ``IdentityError`` with
    reason ``unsigned``, ``unknown_signer`` (no key to check against),
    ``wrong_signer`` or ``bad_signature``."""
    if not env.signed:
        raise IdentityError(f"{what} is not signed, and signatures are required "
                            "(a build older than this one, or a forgery)", "unsigned")
    if key is None:
        raise IdentityError(f"{what} is signed by {PublicKey(env.signer).fingerprint}, "
                            "a key not enrolled or revoked", "unknown_signer")
    if env.signer != key.raw:
        raise IdentityError(f"{what} is signed by {PublicKey(env.signer).fingerprint}, "
                            f"not by the expected key {key.fingerprint}", "wrong_signer")
    if not key.verify(bytes.fromhex(env.digest), env.signature):
        raise IdentityError(f"{what} carries a signature that does not verify", "bad_signature")
