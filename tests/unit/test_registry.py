"""The enrolled devices of a job: enroll, revoke, survive restarts, and a
running aggregator sees a change on its next check."""

import json
import os

import pytest

from aggregator.registry import Registry, RegistryError
from fedge.identity import Identity


def test_enrolled_devices_survive_a_restart_and_revocation_takes_effect_on_reload(tmp_path):
    reg = Registry(tmp_path)
    key = Identity.generate().public
    reg.enroll("dev-1", key)
    running = Registry(tmp_path)  # the aggregator's own copy
    assert running.key_of("dev-1") == key and running.key_of("dev-2") is None
    Registry(tmp_path).revoke("dev-1")  # the operator, from another process
    assert running.key_of("dev-1") == key  # not re-read yet
    assert running.reload() and running.key_of("dev-1") is None
    assert not running.reload()  # unchanged: nothing read
    assert not Registry(tmp_path).devices["dev-1"].active  # the record of who was trusted stays


def test_enrolling_twice_is_a_deliberate_act_and_keys_are_not_shared(tmp_path):
    reg = Registry(tmp_path)
    a, b = Identity.generate().public, Identity.generate().public
    reg.enroll("dev-1", a)
    with pytest.raises(RegistryError, match="--replace"):
        reg.enroll("dev-1", b)
    with pytest.raises(RegistryError, match="own key"):
        reg.enroll("dev-2", a)
    reg.enroll("dev-1", b, replace=True)
    assert reg.key_of("dev-1") == b


def test_enrolling_a_device_again_with_the_key_it_has_changes_nothing(tmp_path):
    reg = Registry(tmp_path)
    key = Identity.generate().public
    first = reg.enroll("dev-1", key)
    written = (tmp_path / "devices.json").read_bytes()
    assert reg.enroll("dev-1", key) == first  # no --replace needed, and nothing rewritten
    assert (tmp_path / "devices.json").read_bytes() == written
    reg.revoke("dev-1")
    with pytest.raises(RegistryError, match="already revoked"):  # reinstating a revoked device is deliberate
        reg.enroll("dev-1", key)
    assert reg.enroll("dev-1", key, replace=True).active


@pytest.mark.parametrize("bad_id", ["", "a/b", "dev+1", "#"])
def test_a_device_id_that_cannot_be_a_topic_level_is_refused(tmp_path, bad_id):
    with pytest.raises(RegistryError):
        Registry(tmp_path).enroll(bad_id, Identity.generate().public)


def test_revoking_an_unknown_device_says_how_to_list_them(tmp_path):
    with pytest.raises(RegistryError, match="fedge devices"):
        Registry(tmp_path).revoke("ghost")


@pytest.mark.parametrize("content", ["not json", "[]", '{"format": 1, "devices": {"d": {"key": "rsa:x"}}}'])
def test_a_damaged_registry_is_one_line_and_keeps_what_was_read(tmp_path, content):
    reg = Registry(tmp_path)
    reg.enroll("dev-1", Identity.generate().public)
    (tmp_path / "devices.json").write_text(content)
    os.utime(tmp_path / "devices.json", ns=(1, 1))
    with pytest.raises(RegistryError) as err:
        reg.reload()
    assert "\n" not in str(err.value) and reg.key_of("dev-1") is not None


def test_the_file_is_plain_json_an_operator_can_read(tmp_path):
    Registry(tmp_path).enroll("dev-1", Identity.generate().public)
    doc = json.loads((tmp_path / "devices.json").read_text())
    assert doc["format"] == 1 and doc["devices"]["dev-1"]["key"].startswith("ed25519:")


def test_a_fleet_is_enrolled_in_one_write_all_or_nothing(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    keys = [Identity.generate().public for _ in range(3)]
    reg.enroll("dev-0", keys[0])
    writes = []
    real = Registry._write
    monkeypatch.setattr(Registry, "_write", lambda self, devices: writes.append(len(devices)) or real(self, devices))
    enrolled, unchanged = reg.enroll_many([("dev-0", keys[0]), ("dev-1", keys[1]), ("dev-2", keys[2])])
    assert [d.id for d in enrolled] == ["dev-1", "dev-2"] and [d.id for d in unchanged] == ["dev-0"]
    assert writes == [3]
    before = (tmp_path / "devices.json").read_bytes()
    fresh = Identity.generate().public
    for batch, why in (
        ([("dev-3", fresh), ("dev-4", fresh)], "dev-4 is already enrolled as dev-3"),  # one key, two devices
        ([("dev-3", fresh), ("dev-3", fresh)], "dev-3 is listed twice"),
        ([("dev-3", fresh), ("dev-1", keys[0])], "dev-1 is already enrolled"),  # without --replace
        ([("dev-3", fresh), ("dev-5", keys[2])], "already enrolled as dev-2"),  # another device's key
        ([("dev-3", fresh), ("bad/id", Identity.generate().public)], "not valid"),
    ):
        with pytest.raises(RegistryError, match=why):
            reg.enroll_many(batch)
        assert (tmp_path / "devices.json").read_bytes() == before  # none of the batch
    # --replace: dev-1 and dev-2 swap keys, which no device holds twice at the end
    reg.enroll_many([("dev-1", keys[2]), ("dev-2", keys[1])], replace=True)
    assert reg.key_of("dev-1") == keys[2] and reg.key_of("dev-2") == keys[1]


def test_enrolling_two_thousand_devices_is_one_pass(tmp_path, monkeypatch):
    # Enrolled one by one, each rewrote the file and scanned every key: N^2.
    calls = []
    reg = Registry(tmp_path)
    real = Registry._write
    monkeypatch.setattr(Registry, "_write", lambda self, devices: calls.append(1) or real(self, devices))
    fleet = [(f"pi-{i:04d}", Identity.generate().public) for i in range(2000)]
    enrolled, _ = reg.enroll_many(fleet)
    assert len(enrolled) == 2000 and calls == [1]
    assert len(Registry(tmp_path).active()) == 2000
