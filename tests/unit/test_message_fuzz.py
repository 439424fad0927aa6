"""Every message parser turns any header a sender can write into a typed
value or a ``FedgeError`` (a counted rejection), never another exception
(hypothesis over JSON headers)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge import wire
from fedge.errors import FedgeError
from fedge.messages import (
    Ack,
    Artifact,
    Decline,
    DeviceRecord,
    GlobalModel,
    KeyChain,
    ModelDelta,
    RoundAnnouncement,
    SecAggStage,
    Status,
    Update,
)
from fedge.wire import Kind

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)
PARSERS = {Kind.STATUS: Status, Kind.UPDATE: Update, Kind.ROUND: RoundAnnouncement, Kind.ACK: Ack,
           Kind.DECLINE: Decline, Kind.MODEL: GlobalModel, Kind.MODEL_DELTA: ModelDelta, Kind.ARTIFACT: Artifact,
           Kind.KEYS: KeyChain, Kind.SECAGG: SecAggStage, Kind.DEVICE: DeviceRecord}
FIELDS = ["job", "round", "attempt", "sender", "state", "info", "update_id", "num_samples", "codec", "base_model",
          "loss", "train_seconds", "selected", "model_digest", "deadline_s", "training", "issued_at", "key_digest",
          "key_round", "client", "status", "reason", "spec", "model", "model_args", "key_round", "target_digest",
          "links", "stage", "ids", "peers", "kinds", "indices", "device", "online", "last_seen", "rounds",
          "last_receipt"]
VALID = {"job": "j", "round": 1, "attempt": 1, "sender": "dev-1", "state": "online", "info": {}, "update_id": "u",
         "num_samples": 10, "codec": {"name": "none"}, "base_model": "0" * 64, "selected": ["dev-1"],
         "model_digest": "0" * 64, "deadline_s": 60, "training": {}, "issued_at": 0.0, "key_digest": "0" * 64,
         "key_round": 0, "client": "dev-1", "status": "accepted", "links": [],
         "stage": "survivors", "ids": [], "peers": ["dev-1"], "device": "dev-1", "online": True,
         "last_seen": 1.0, "rounds": 3, "last_receipt": "accepted"}


# Recursive JSON is slow to draw on a cold start (no example database): not a property of the parsers.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(PARSERS)), base=st.booleans(), changes=st.dictionaries(
    st.sampled_from(FIELDS), JSON, max_size=4), body=st.binary(max_size=64))
def test_any_header_parses_or_is_refused_with_a_reason(kind, base, changes, body):
    header = {**(VALID if base else {}), **changes}
    try:
        message = wire.encode(kind, header, body)
    except (TypeError, ValueError):
        return  # not encodable as our JSON header: nothing a peer could send either
    try:
        PARSERS[kind].parse(wire.decode(message))
    except FedgeError as exc:
        assert exc.reason and str(exc)


def test_presence_info_and_update_timings_are_typed_at_the_boundary():
    import pytest

    bad_status = wire.encode(Kind.STATUS, {"sender": "dev-1", "state": "online", "info": "not an object"})
    with pytest.raises(FedgeError, match="info"):
        Status.parse(wire.decode(bad_status))
    header = {**VALID, "train_seconds": "fast"}
    with pytest.raises(FedgeError, match="train_seconds"):
        Update.parse(wire.decode(wire.encode(Kind.UPDATE, header, b"")))
