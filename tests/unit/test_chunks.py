"""Chunking and bounded reassembly: loss, reordering, duplicates, hostile chunks."""

import os
import tracemalloc

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
    # Chunks this small are charged 1 KiB each (see the module docstring).
    r = Reassembler(max_bytes=8 << 20, max_message_bytes=8 << 20)
    done = [out for i in feed if (out := r.feed("dev", parts[i], 0.0)) is not None]
    assert done == [message]
    assert r.held == 0 and len(r) == 0


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
    r = Reassembler(max_bytes=8 << 20, timeout_s=30)
    if len(parts) > 1:
        assert all(r.feed("dev", p, 1.0) is None for i, p in enumerate(parts) if i != lost)
    # Later rounds' messages on the same stream still get through.
    nxt = message + b"next"
    outs = [r.feed("dev", p, 2.0) for p in chunks.split(nxt, size)]
    assert outs[-1] == nxt
    r.expire(100.0)
    assert r.held == 0


def test_streams_are_isolated():
    msg = b"x" * 5000
    parts = chunks.split(msg, 1000)
    r = Reassembler()
    for p in parts[:-1]:
        assert r.feed("alice", p, 0) is None
    # The last chunk under another stream does not complete alice's message.
    assert r.feed("mallory", parts[-1], 0) is None
    assert r.feed("alice", parts[-1], 0) == msg


def _chunk(total: int, count: int, index: int, data: bytes, mid: bytes | None = None) -> bytes:
    """A chunk with any header a hostile sender likes."""
    head = CHUNK_HEADER.pack(chunks.CHUNK_MAGIC, chunks.CHUNK_VERSION, 0, mid or os.urandom(16), index, count, total)
    return head + data


def test_a_flood_of_first_chunks_claiming_huge_totals_holds_only_the_bytes_sent():
    # The incident: 16 one-KiB publishes, each announcing a 16 MiB message,
    # used to reserve 256 MiB and block every real update.
    r = Reassembler(max_bytes=256 << 20, max_message_bytes=16 << 20, check_ids=False)
    flood = [_chunk(16 << 20, 16 << 10, 0, os.urandom(1024)) for _ in range(16)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, payload in enumerate(flood):
            assert r.feed(f"mallory-{n}", payload, 0) is None
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert r.held == 16 * 1024 and r.reserved == r.held
    assert all(r.held_by(f"mallory-{n}") == 1024 for n in range(16))
    assert grown < 256 << 10
    update = os.urandom(3 << 20)
    assert [r.feed("dev", p, 1) for p in chunks.split(update, 250 << 10)][-1] == update


def test_a_stream_never_holds_more_than_its_limit_and_its_oldest_partial_goes_first():
    r = Reassembler(max_message_bytes=10_000)  # and so max_stream_bytes=10_000
    a = chunks.split(b"a" * 8000, 2000)
    b = chunks.split(b"b" * 8000, 2000)
    for p in a[:3]:
        r.feed("dev", p, 0)
    r.feed("dev", b[0], 1)
    r.feed("dev", b[1], 1)
    assert r.held_by("dev") == 10_000 and len(r) == 2
    r.feed("dev", b[2], 1)  # 12 000 bytes would be too many: the older message goes
    assert r.held_by("dev") == 6000 and len(r) == 1 and r.counters["superseded"] == 1
    assert r.feed("dev", b[3], 1) == b"b" * 8000
    assert r.held == 0 and r.held_by("dev") == 0


def test_a_stream_flooding_partials_stays_under_its_limit():
    r = Reassembler(max_bytes=1 << 20, max_message_bytes=50_000, max_partials_per_stream=100)
    for _ in range(200):
        r.feed("mallory", _chunk(50_000, 25, 0, os.urandom(2000)), 0)
        assert r.held_by("mallory") <= 50_000
    assert r.held_by("mallory") == 50_000 and r.counters["superseded"] == 175


def test_a_message_larger_than_the_stream_limit_is_dropped():
    r = Reassembler(max_message_bytes=10_000, max_stream_bytes=5000)
    parts = chunks.split(b"c" * 8000, 2000)
    r.feed("dev", parts[0], 0)
    r.feed("dev", parts[1], 0)
    with pytest.raises(ChunkError) as err:
        r.feed("dev", parts[2], 0)
    assert err.value.reason == "stream_full"
    assert r.held == 0 and len(r) == 0


def test_full_buffers_refuse_the_greediest_stream_with_overflow():
    r = Reassembler(max_bytes=20_000, max_message_bytes=1 << 20, check_ids=False)
    reasons = []
    for n in range(50):
        try:
            r.feed(f"m{n}", _chunk(1 << 20, 256, 0, os.urandom(4096)), 0)
        except ChunkError as exc:
            reasons.append(exc.reason)
        assert r.held <= 20_000
        assert r.held == sum(r.held_by(f"m{k}") for k in range(50))
    assert reasons == ["overflow"] * 46 and r.counters["overflow"] == 46 and r.held == 4 * 4096


def test_a_completing_chunk_is_accepted_when_the_buffers_are_full():
    r = Reassembler(max_bytes=10_000, max_message_bytes=8000)
    a = chunks.split(b"a" * 8000, 2000)
    b = chunks.split(b"b" * 8000, 2000)
    for p in a[:3]:
        r.feed("a", p, 0)
    r.feed("b", b[0], 0)
    r.feed("b", b[1], 0)
    with pytest.raises(ChunkError) as err:
        r.feed("b", b[2], 0)  # b would hold as much as a: no reason to prefer it
    assert err.value.reason == "overflow"
    assert r.held == 10_000
    assert r.feed("a", a[3], 0) == b"a" * 8000
    assert [r.feed("b", p, 0) for p in b[2:]][-1] == b"b" * 8000
    assert r.held == 0


def test_a_real_update_completes_while_other_streams_flood():
    # Two senders keep growing messages that announce 50 kB and never end
    # them; the buffers fill up, and a real update still gets through
    # because the flooders, holding more, lose their partial messages first.
    r = Reassembler(max_bytes=64_000, max_message_bytes=50_000, check_ids=False)
    update = os.urandom(20_000)
    real = chunks.split(update, 4000)
    flood = {name: (os.urandom(16), iter(range(24))) for name in ("m1", "m2")}
    done = []
    for step in range(200):
        for name, (mid, indexes) in list(flood.items()):
            index = next(indexes, None)
            if index is None:  # start another endless message
                mid, indexes = os.urandom(16), iter(range(24))
                flood[name] = (mid, indexes)
                index = next(indexes)
            try:
                r.feed(name, _chunk(50_000, 25, index, os.urandom(2000), mid), step)
            except ChunkError as exc:
                assert exc.reason == "overflow"
            assert r.held <= 64_000
        if step % 20 == 10 and real:
            out = r.feed("dev", real.pop(0), step)
            if out is not None:
                done.append(out)
    assert done == [update]
    assert r.counters["evicted"] > 0


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=1, max_size=6000), min_size=1, max_size=4),
    size=st.sampled_from([1000, 1024, 1500, 3000]),
    data=st.data(),
)
def test_bounds_hold_whatever_arrives(messages, size, data):
    # Genuine chunks of a few messages on three streams, in any order, lost
    # or repeated, under limits small enough that every bound is reached.
    r = Reassembler(max_bytes=9000, max_message_bytes=6000, max_stream_bytes=7000, timeout_s=50)
    sent = {(stream, i): chunks.split(m, size) for stream in ("a", "b", "c") for i, m in enumerate(messages)}
    pool = [(key, j) for key, parts in sent.items() for j in range(len(parts))]
    feed = data.draw(st.lists(st.sampled_from(pool), max_size=60))
    for step, ((stream, i), j) in enumerate(feed):
        try:
            out = r.feed(stream, sent[(stream, i)][j], step)
        except ChunkError as exc:
            assert exc.reason in ("overflow", "stream_full")
            out = None
        assert out is None or out == messages[i]
        assert r.held <= 9000 and all(r.held_by(s) <= 7000 for s in "abc")
        assert r.held == sum(r.held_by(s) for s in "abc")
    r.expire(10_000)
    assert r.held == 0 and len(r) == 0


def test_oversized_message_is_refused_from_its_first_chunk():
    r = Reassembler(max_message_bytes=1000)
    with pytest.raises(ChunkError) as err:
        r.feed("a", chunks.split(b"z" * 5000, 500)[3], 0)
    assert err.value.reason == "oversized"
    assert r.held == 0


def test_partial_messages_expire():
    r = Reassembler(timeout_s=10)
    parts = chunks.split(b"q" * 3000, 1500)
    r.feed("a", parts[0], 0)
    assert r.held == 1500
    assert r.expire(5) == 0
    assert r.expire(10) == 1
    assert r.held == 0 and r.counters["expired"] == 1


def test_a_stream_holds_a_bounded_number_of_partials():
    r = Reassembler(max_partials_per_stream=2)
    for n in range(5):
        r.feed("a", chunks.split(bytes([n]) * 3000, 1000)[0], 0)
    assert len(r) == 2 and r.counters["superseded"] == 3


def test_tiny_chunks_are_charged_for_their_bookkeeping():
    # One-byte chunks cost Python about 120 bytes each to keep: held bytes
    # must still bound memory.
    r = Reassembler(max_bytes=1 << 30, max_message_bytes=1 << 20, max_stream_bytes=1 << 30)
    parts = chunks.split(os.urandom(20_000), 1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for p in parts[:-1]:
            r.feed("dev", p, 0)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert r.held == (len(parts) - 1) * chunks.MIN_CHUNK_DATA
    assert grown <= r.held
    r.feed("dev", parts[-1], 0)
    assert r.held == 0


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
    assert r.held == 0 and len(r) == 0


@pytest.mark.parametrize(
    "forged",
    [
        [_chunk(3000, 3, 0, b"a" * 1000), _chunk(3000, 3, 1, b"a" * 999)],  # middle chunks differ in size
        [_chunk(3000, 3, 1, b"a" * 1600)],  # two such chunks reach past the end
        [_chunk(3000, 3, 2, b"a" * 2999)],  # the last chunk alone leaves no room before it
        [_chunk(3000, 3, 2, b"a" * 500), _chunk(3000, 3, 0, b"a" * 1000)],  # they cannot add up to 3000
        [_chunk(3000, 1, 0, b"a" * 2000)],  # a single chunk shorter than the message
    ],
)
def test_chunks_that_cannot_make_the_announced_message_drop_it(forged):
    mid = os.urandom(16)
    r = Reassembler(check_ids=False)
    with pytest.raises(ChunkError) as err:
        for payload in forged:
            r.feed("a", payload[:6] + mid + payload[22:], 0)
    assert err.value.reason == "malformed"
    assert r.held == 0 and len(r) == 0


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
