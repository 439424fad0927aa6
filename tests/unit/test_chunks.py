"""Chunking and bounded reassembly: loss, reordering, duplicates, hostile chunks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge import chunks
from fedge.chunks import CHUNK_HEADER, ChunkError, Reassembler


@settings(max_examples=150)
@given(message=st.binary(max_size=4000), size=st.integers(1, 700), data=st.data())
def test_reordered_and_duplicated_chunks_reassemble_once(message, size, data):
    parts = chunks.split(message, size)
    assert all(len(p) <= size + CHUNK_HEADER.size for p in parts)
    order = data.draw(st.permutations(range(len(parts))))
    last = order[-1]
    # QoS 1 redeliveries of any chunk but the completing one, arriving before it.
    dups = data.draw(st.lists(st.sampled_from(order[:-1]), max_size=5)) if len(parts) > 1 else []
    feed = [*data.draw(st.permutations(list(order[:-1]) + dups)), last]
    r = Reassembler(max_bytes=1 << 20, max_message_bytes=1 << 20)
    done = [out for i in feed if (out := r.feed("dev", parts[i], 0.0)) is not None]
    assert done == [message]
    assert r.reserved == 0 and len(r) == 0


def test_a_message_sent_again_after_delivery_completes_again():
    # An agent resending after a lost receipt must be heard again: the
    # aggregator answers it with a "duplicate" receipt.
    parts = chunks.split(b"update" * 500, 1000)
    r = Reassembler()
    assert [r.feed("dev", p, 0) for p in parts][-1] == b"update" * 500
    assert [r.feed("dev", p, 1) for p in parts][-1] == b"update" * 500


@given(message=st.binary(min_size=10, max_size=2000), size=st.integers(1, 100), data=st.data())
def test_lost_chunk_never_completes_and_never_blocks_the_next_message(message, size, data):
    parts = chunks.split(message, size)
    lost = data.draw(st.integers(0, len(parts) - 1))
    r = Reassembler(max_bytes=1 << 20, timeout_s=30)
    if len(parts) > 1:
        assert all(r.feed("dev", p, 1.0) is None for i, p in enumerate(parts) if i != lost)
    # Later rounds' messages on the same stream still get through.
    nxt = message + b"next"
    outs = [r.feed("dev", p, 2.0) for p in chunks.split(nxt, size)]
    assert outs[-1] == nxt
    r.expire(100.0)
    assert r.reserved == 0


def test_streams_are_isolated():
    msg = b"x" * 5000
    parts = chunks.split(msg, 1000)
    r = Reassembler()
    for p in parts[:-1]:
        assert r.feed("alice", p, 0) is None
    # The last chunk under another stream does not complete alice's message.
    assert r.feed("mallory", parts[-1], 0) is None
    assert r.feed("alice", parts[-1], 0) == msg


def test_memory_bound_refuses_new_messages_until_room():
    r = Reassembler(max_bytes=10_000, max_message_bytes=8_000)
    a = chunks.split(b"a" * 6000, 1000)
    b = chunks.split(b"b" * 6000, 1000)
    r.feed("a", a[0], 0)
    with pytest.raises(ChunkError) as err:
        r.feed("b", b[0], 0)
    assert err.value.reason == "overflow"
    for p in a[1:]:
        r.feed("a", p, 0)
    assert r.reserved == 0
    assert [r.feed("b", p, 0) for p in b][-1] == b"b" * 6000


def test_oversized_message_is_refused_from_its_first_chunk():
    r = Reassembler(max_message_bytes=1000)
    with pytest.raises(ChunkError) as err:
        r.feed("a", chunks.split(b"z" * 5000, 500)[3], 0)
    assert err.value.reason == "oversized"


def test_partial_messages_expire():
    r = Reassembler(timeout_s=10)
    parts = chunks.split(b"q" * 3000, 1000)
    r.feed("a", parts[0], 0)
    assert r.reserved == 3000
    assert r.expire(5) == 0
    assert r.expire(10) == 1
    assert r.reserved == 0 and r.counters["expired"] == 1


def test_a_stream_holds_a_bounded_number_of_partials():
    r = Reassembler(max_partials_per_stream=2)
    for n in range(5):
        r.feed("a", chunks.split(bytes([n]) * 3000, 1000)[0], 0)
    assert len(r) == 2 and r.counters["superseded"] == 3


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: b"XXXX" + c[4:],  # magic
        lambda c: c[:4] + b"\x09" + c[5:],  # version
        lambda c: c[:10],  # shorter than a header
        lambda c: c[:22] + (99).to_bytes(4, "little") + c[26:],  # index >= count
    ],
)
def test_malformed_chunks_raise(mutate):
    part = chunks.split(b"hello world" * 10, 40)[0]
    with pytest.raises(ChunkError):
        Reassembler().feed("a", mutate(part), 0)


def test_disagreeing_chunks_drop_the_message():
    a = chunks.split(b"a" * 3000, 1000)
    forged = bytearray(a[1])
    forged[30:38] = (4000).to_bytes(8, "little")  # another total length, same id
    r = Reassembler()
    r.feed("a", a[0], 0)
    with pytest.raises(ChunkError):
        r.feed("a", bytes(forged), 0)
    assert r.reserved == 0


def test_forged_content_under_a_known_id_is_caught():
    a = chunks.split(b"a" * 3000, 1000)
    forged = a[1][: CHUNK_HEADER.size] + b"b" * 1000
    r = Reassembler()
    r.feed("a", a[0], 0)
    r.feed("a", forged, 0)
    with pytest.raises(ChunkError) as err:
        r.feed("a", a[2], 0)
    assert err.value.reason == "checksum"


def test_chunk_size_keeps_packets_under_the_broker_limit():
    limit = 131072  # AWS IoT Core
    size = chunks.chunk_data_size(limit)
    part = chunks.split(b"x" * 500_000, size)[0]
    assert len(part) + chunks.PACKET_OVERHEAD <= limit
    with pytest.raises(ValueError):
        chunks.chunk_data_size(1500)
