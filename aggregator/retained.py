"""What the job keeps retained on the broker, and how the aggregator keeps
it there: the key model and the delta (chunked; a shorter message clears the
tail a longer one left), the round announcement (signed and stamped), the
key chain. A broker may lose, withhold or replace any of it; the shell
publishes it again after a reconnect without a session and whenever the
announcement it reads back is not its own (``foreign``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aggregator.keys import AggregatorKeys
from aggregator.state import StateDir
from fedge.topics import JobTopics

log = logging.getLogger("fedge.aggregator")

PUBLISHED_FILE = "published.json"  # chunks each retained message took, so a shorter one clears the rest
ANNOUNCEMENTS_KEPT = 8
REPAIR_EVERY_S = 5.0
# A job waiting for devices that has heard no presence for this long reads
# the retained presence again (doubling each time, up to the second).
PRESENCE_REFRESH_S = (30.0, 900.0)


class Retained:
    def __init__(self, link: Any, topics: JobTopics, keys: AggregatorKeys, state: StateDir) -> None:
        self.link, self.topics, self.keys, self.state = link, topics, keys, state
        self.announced: list[bytes] = []  # the last announcements published, newest last
        self.seen = False  # our own came back: what arrives from then on is the broker's copy
        self.repaired_at = -60.0
        self.presence_at = 0.0  # when a presence last arrived (the shell sets it)
        self._presence_wait = PRESENCE_REFRESH_S[0]

    def chunked(self, what: str, topic_for: Callable[[int], str], message: bytes | None) -> None:
        """Publish ``message`` retained as chunks (or clear it, for None), and
        clear chunks an earlier, longer message left behind: a device that
        subscribes must not receive a stale tail."""
        count = len(self.link.publish_chunked(topic_for, self.keys.seal(message), retain=True)) if message else 0
        chunks = self.state.load_json(PUBLISHED_FILE)
        for i in range(count, int(chunks.get(what, 0))):
            self.link.clear_retained(topic_for(i))
        if chunks.get(what) != count:
            self.state.save_json(PUBLISHED_FILE, {**chunks, what: count})

    def announcement(self, message: bytes) -> None:
        if len(message) > self.link.max_packet_bytes - 1024:
            log.error("round announcement is %d bytes, over the broker's packet limit (%d bytes); "
                      "lower selection.max_clients", len(message), self.link.max_packet_bytes)
        sealed = self.keys.seal(self.keys.stamped(message))
        self.announced = [*self.announced[-(ANNOUNCEMENTS_KEPT - 1):], sealed]
        self.link.publish(self.topics.round, sealed, retain=True)

    def key_chain(self) -> None:
        chain = self.keys.key_chain()
        if chain is not None:
            self.link.publish(self.topics.keys, chain, retain=True)

    def foreign(self, payload: bytes, now: float) -> bool:
        """Whether the announcement the broker holds (we subscribe to our
        own) must be replaced: one we did not publish (replaced on a broker
        without ACL) or none (cleared), at most once every 5 seconds. Until
        the first of ours comes back, what arrives is the copy retained
        before this process published (a restart)."""
        if payload in self.announced:
            self.seen = True
            return False
        if not self.seen or now - self.repaired_at < REPAIR_EVERY_S:
            return False
        self.repaired_at = now
        return True

    def refresh_presence(self, now: float, awaits_devices: bool) -> bool:
        """Subscribe to the devices' presence again when the job waits for
        devices and none has been heard for a while: a presence a broker
        failed to deliver (a clustered broker's node under load, a stalled
        subscription) would otherwise keep a job waiting for good. The
        retained copies come back with the subscription. Returns whether it
        did."""
        if not awaits_devices:
            self._presence_wait = PRESENCE_REFRESH_S[0]
            return False
        if now - self.presence_at < self._presence_wait or not self.link.connected.is_set():
            return False
        log.info("waiting for devices and no presence heard for %.0f s: reading the retained presence again",
                 now - self.presence_at)
        self.presence_at = now
        self._presence_wait = min(2 * self._presence_wait, PRESENCE_REFRESH_S[1])
        # Anew: a broker may take the same subscription again as a no-op (NATS's gateway, found at 10,000 devices).
        self.link.unsubscribe(self.topics.status_filter)
        self.link.subscribe(self.topics.status_filter)
        return True

