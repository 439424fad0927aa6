"""Ed25519 identities: keys made, saved owner-only, loaded, and signatures
that bind exactly one digest."""

import hashlib
import os

import pytest

from fedge.identity import Identity, IdentityError, PublicKey, read_public_key


def test_a_signature_verifies_for_its_digest_and_key_only():
    me, other = Identity.generate(), Identity.generate()
    digest = hashlib.sha256(b"a message").digest()
    sig = me.sign(digest)
    assert me.public.verify(digest, sig)
    assert not other.public.verify(digest, sig)
    assert not me.public.verify(hashlib.sha256(b"another").digest(), sig)
    assert not me.public.verify(digest, bytes(64))
    assert not me.public.verify(digest, sig[:10])


def test_public_keys_round_trip_as_text():
    key = Identity.generate().public
    text = key.to_text()
    assert text.startswith("ed25519:") and len(text) == len("ed25519:") + 43
    assert PublicKey.from_text(text) == key and read_public_key(text) == key
    for bad in ("ed25519:!!!", "rsa:AAAA", "ed25519:" + "A" * 10):
        with pytest.raises(IdentityError):
            PublicKey.from_text(bad)


def test_a_private_key_file_is_owner_only_and_never_overwritten(tmp_path):
    me = Identity.generate()
    path = tmp_path / "keys" / "device.key"
    me.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Identity.load(path).public == me.public
    with pytest.raises(IdentityError, match="never overwritten"):
        Identity.generate().save(path)


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "device.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


PEM_JUNK = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("content", [b"", b"not a key", PEM_JUNK])
def test_a_file_that_is_not_a_key_gets_one_line(tmp_path, content):
    path = tmp_path / "device.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError) as err:
        Identity.load(path)
    assert "\n" not in str(err.value)


def test_a_missing_key_file_names_the_command_that_makes_one(tmp_path):
    with pytest.raises(IdentityError, match="fedge keys new"):
        Identity.load(tmp_path / "absent.key")
