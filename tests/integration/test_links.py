"""MQTT links release everything they hold when stopped."""

from __future__ import annotations

import os

from fedge.mqtt import MqttLink
from tests.integration.support import broker_settings


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stopped_links_leave_no_descriptors_behind(mosquitto):
    # A simulated fleet or a benchmark opens and closes hundreds of links in
    # one process; paho's select() fails once descriptors pass 1024.
    settings = broker_settings(mosquitto.url)

    def cycle(n: int) -> None:
        links = [MqttLink(settings, f"leak-{i}", lambda ev: None, persistent=False) for i in range(n)]
        for link in links:
            link.start()
        for link in links:
            assert link.wait_connected(10), "link did not connect"
        for link in links:
            link.stop()

    cycle(5)  # warm up whatever paho and the resolver cache
    before = open_descriptors()
    cycle(20)
    assert open_descriptors() - before <= 2
