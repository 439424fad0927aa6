"""The inbox between network threads and a role's thread is bounded in bytes."""

import threading
import time

from fedge.mqtt import Inbound, Inbox


def msg(n):
    return Inbound("l", "t", b"x" * n, False)


def test_a_full_inbox_makes_the_producer_wait_until_the_consumer_drains():
    box = Inbox(maxsize=100, max_bytes=1000)
    box.put(msg(600))
    done = threading.Event()

    def producer():
        box.put(msg(600))  # would exceed 1000 bytes: waits
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.2)
    assert box.get(0).payload == b"x" * 600
    assert done.wait(2)
    t.join()
    assert len(box) == 1


def test_one_oversized_item_is_always_admitted_into_an_empty_inbox():
    box = Inbox(max_bytes=10)
    box.put(msg(1000))
    assert len(box.get(0).payload) == 1000


def test_get_times_out_empty():
    box = Inbox()
    start = time.monotonic()
    assert box.get(0.05) is None
    assert time.monotonic() - start >= 0.04
