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


# --- signed envelopes ------------------------------------------------------------

from fedge import wire  # noqa: E402
from fedge.identity import check_signed  # noqa: E402


def test_a_signed_envelope_carries_its_signer_and_verifies():
    me = Identity.generate()
    msg = wire.encode(wire.Kind.STATUS, {"sender": "d"}, b"body", signer=me)
    env = wire.decode(msg)
    assert env.signed and env.signer == me.public.raw and env.body == b"body"
    check_signed(env, me.public, "presence")
    assert wire.seal(wire.encode(wire.Kind.STATUS, {"sender": "d"}, b"body"), me) == msg  # deterministic: Ed25519


@pytest.mark.parametrize("case", ["unsigned", "unknown_signer", "wrong_signer", "bad_signature"])
def test_every_way_a_signature_can_fail_has_its_reason(case):
    me, other = Identity.generate(), Identity.generate()
    msg = wire.encode(wire.Kind.UPDATE, {"round": 1}, b"x" * 10, signer=None if case == "unsigned" else me)
    if case == "bad_signature":  # a valid digest (recomputed by a forger) under a stolen trailer
        forged = wire.encode(wire.Kind.UPDATE, {"round": 2}, b"x" * 10, signer=other)
        msg = forged[:-96] + msg[-96:]
    env = wire.decode(msg)
    with pytest.raises(IdentityError) as err:
        check_signed(env, None if case == "unknown_signer" else (other.public if case == "wrong_signer"
                                                                  else me.public), "an update")
    assert err.value.reason == case


def test_a_stripped_signature_is_an_unsigned_message_and_a_cut_trailer_is_malformed():
    me = Identity.generate()
    msg = wire.encode(wire.Kind.ACK, {"a": 1}, b"", signer=me)
    with pytest.raises(wire.WireError):
        wire.decode(msg[:-1])  # the flag promises a trailer
    plain = wire.encode(wire.Kind.ACK, {"a": 1}, b"")
    assert not wire.decode(plain).signed
    with pytest.raises(wire.WireError, match="sha256 mismatch"):
        wire.decode(msg[:4] + b"\x01\x06\x00\x00" + msg[8:-96])  # flag cleared, digest not recomputed


def test_a_key_chain_leads_from_any_earlier_key_to_the_current_one_and_only_signed_links_count():
    from fedge.identity import follow_chain, sign_link

    k1, k2, k3, evil = (Identity.generate() for _ in range(4))
    chain = [sign_link("job", k1, k2.public), sign_link("job", k2, k3.public)]
    assert follow_chain("job", k1.public, chain) == k3.public
    assert follow_chain("job", k2.public, chain) == k3.public  # a device that pinned the second key
    assert follow_chain("job", k3.public, chain) == k3.public
    assert follow_chain("other-job", k1.public, chain) == k1.public  # a link binds its job
    hijack = [(k1.public.to_text(), evil.public.to_text(), sign_link("job", evil, evil.public)[2])]
    assert follow_chain("job", k1.public, hijack + chain) == k3.public  # a link k1 did not sign is passed over
    garbage = [("nonsense", "x", "y"), (k1.public.to_text(), k2.public.to_text(), "!!")]
    assert follow_chain("job", k1.public, garbage) == k1.public
