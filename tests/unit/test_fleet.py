"""The aggregator's device records (``aggregator.fleet``): what changes them,
their bound, and a damaged file."""

from __future__ import annotations

from aggregator.fleet import Fleet
from fedge import wire
from fedge.messages import DeviceRecord

INFO = {"role": "trainer", "ram_mb": 4096, "cpus": 4, "arch": "aarch64", "board": "Raspberry Pi 4 Model B",
        "fedge": "0.1.0", "codecs": ["int2", "int8"], "secret": "dropped", "cpus_extra": [1]}


def test_presence_and_receipts_make_the_record_and_only_changes_are_published():
    fleet = Fleet("j", max_devices=10)
    fleet.presence("pi-1", True, INFO, now=100.0)
    [rec] = fleet.take_dirty()
    assert rec.online and rec.last_seen == 100.0 and rec.rounds == 0 and rec.info["board"].startswith("Raspberry")
    assert "secret" not in rec.info and "cpus_extra" not in rec.info
    assert fleet.take_dirty() == []
    fleet.heard("pi-1", 150.0)
    assert fleet.take_dirty() == []  # a message alone is shown with the next change
    fleet.receipt("pi-1", "accepted", 3, 160.0)
    fleet.receipt("pi-1", "duplicate", 3, 161.0)
    fleet.receipt("pi-1", "rejected: stale_base", 4, 170.0)
    [rec] = fleet.take_dirty()
    assert (rec.rounds, rec.last_receipt, rec.last_round, rec.last_seen) == (1, "rejected: stale_base", 4, 170.0)
    # A will that fired long ago (delivered retained at start) keeps the last-seen time.
    fleet.presence("pi-1", False, {}, now=999.0)
    [rec] = fleet.take_dirty()
    assert not rec.online and rec.last_seen == 170.0 and rec.info["arch"] == "aarch64"
    # Round trip through the wire.
    assert DeviceRecord.parse(wire.decode(rec.encode())) == rec


def test_receipts_and_wills_of_unknown_devices_make_no_record():
    fleet = Fleet("j", max_devices=10)
    fleet.receipt("ghost", "accepted", 1, 1.0)
    fleet.presence("ghost", False, {}, 1.0)
    assert fleet.entries == {} and fleet.take_dirty() == []


def test_the_ledger_is_bounded_and_evicts_the_offline_device_heard_from_longest_ago():
    fleet = Fleet("j", max_devices=3)
    for i, t in enumerate((10.0, 5.0, 20.0)):
        fleet.presence(f"d{i}", True, {}, t)
    fleet.presence("d0", False, {}, 30.0)
    fleet.presence("d1", False, {}, 30.0)
    fleet.presence("d3", True, {}, 40.0)  # evicts d1 (offline, last seen at 5)
    assert sorted(fleet.entries) == ["d0", "d2", "d3"]
    fleet.presence("d0", True, {}, 50.0)
    fleet.presence("d4", True, {}, 60.0)  # all online: not tracked
    assert sorted(fleet.entries) == ["d0", "d2", "d3"]


def test_a_saved_ledger_comes_back_and_damaged_entries_are_skipped():
    fleet = Fleet("j", max_devices=10)
    fleet.presence("a", True, INFO, 1.0)
    fleet.receipt("a", "accepted", 1, 2.0)
    saved = fleet.to_json()
    saved["devices"]["bad/id"] = saved["devices"]["a"]
    saved["devices"]["b"] = {"online": True}
    again = Fleet("j", max_devices=10)
    again.load(saved)
    assert list(again.entries) == ["a"] and again.entries["a"].rounds == 1
    other = Fleet("another-job", max_devices=10)
    other.load(saved)
    assert other.entries == {}
    Fleet("j", 10).load({"job": "j", "devices": ["not", "a", "dict"]})  # nothing, and no exception
