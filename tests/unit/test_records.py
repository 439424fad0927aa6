"""The round record: one typed value from the core to the log, the events
topic, fedge watch and the demo; parsed, never trusted, when read back."""

from __future__ import annotations

import pytest

from fedge.records import RecordError, RoundRecord

LINE = {"round": 3, "attempt": 1, "status": "ok", "closed_by": "quorum", "selected": 4, "clients": 3,
        "declined": 1, "late": 0, "rejected": {"stale_base": 2}, "num_samples": 120, "train_loss": 0.5,
        "bytes_up": 1000, "bytes_down": 5000, "seconds": 0.25, "model_digest": "ab" * 32,
        "accepted": ["a", "b", "c"], "accuracy": 0.9, "time": 1.5, "dropped_chunks": 0}


def test_a_record_round_trips_through_json_and_reads_by_key():
    record = RoundRecord.from_json(LINE)
    assert record.accepted == ("a", "b", "c") and record.accuracy == 0.9 and record.loss is None
    assert record.to_json() == LINE
    assert record["clients"] == 3 and record.get("loss") is None and "accuracy" in record
    with pytest.raises(KeyError):
        record["loss"]
    assert record.replace(recovered=True).to_json()["recovered"] is True


def test_keys_from_a_newer_build_are_kept():
    record = RoundRecord.from_json({**LINE, "epsilon": 1.5})
    assert record.extra == {"epsilon": 1.5} and record.to_json()["epsilon"] == 1.5


@pytest.mark.parametrize("change", [
    {"round": "3"}, {"round": True}, {"seconds": "fast"}, {"accepted": "abc"}, {"rejected": {"x": "2"}},
    {"accuracy": [0.9]}, {"status": 1},
])
def test_a_field_of_the_wrong_type_is_refused(change):
    with pytest.raises(RecordError):
        RoundRecord.from_json({**LINE, **change})


def test_missing_fields_and_non_objects_are_refused():
    with pytest.raises(RecordError, match="lacks"):
        RoundRecord.from_json({k: v for k, v in LINE.items() if k != "clients"})
    with pytest.raises(RecordError):
        RoundRecord.from_json(["not", "a", "record"])


def test_the_event_of_a_round_of_thousands_fits_and_reads_back():
    # A round of 10,000 devices lists 10,000 accepted ids: 80 KB, past the
    # header's limit, which stopped the round's event, log line and hooks.
    from fedge import wire
    from fedge.messages import encode_event, parse_event

    record = RoundRecord(round=3, attempt=1, status="ok", closed_by="quorum", selected=10_000, clients=10_000,
                         declined=0, late=0, rejected={}, num_samples=600_000, train_loss=0.2, bytes_up=1,
                         bytes_down=1, seconds=30.0, model_digest="d" * 64,
                         accepted=tuple(f"device-{i:06d}" for i in range(10_000))).to_json()
    assert parse_event(wire.decode(encode_event("big", record))) == record
    old = wire.encode(wire.Kind.EVENT, {"job": "j", "round": 1, "sender": "aggregator", "num_samples": 0,
                                        "codec": None, "record": {"round": 1}})
    assert parse_event(wire.decode(old)) == {"round": 1}  # as aggregators before this sent it
