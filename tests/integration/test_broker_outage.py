"""An unreachable broker is never silent: a link says so within seconds,
naming the URL and why, keeps retrying, says so again while it lasts and
once when the broker is back; a fleet's links share those lines; the metrics
show it; and ``fedge watch`` says it too. The broker that comes up is a real
Mosquitto on the port the link has been retrying."""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.service import AggregatorService
from fedge.config import updated
from fedge.mqtt import OUTAGES, MqttLink
from tests.conftest import Mosquitto, fedge_cmd, free_port

from .support import broker_settings, job_config, wait_for

pytestmark = pytest.mark.integration


def said(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedge.mqtt" and words in r.getMessage()]


def test_a_link_says_it_cannot_reach_the_broker_keeps_trying_and_says_when_it_does(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    monkeypatch.setattr(OUTAGES, "period_s", 2.0)  # "still ..." every 2 s instead of every minute
    port = free_port()  # nothing listens on it (yet)
    url = f"mqtt://127.0.0.1:{port}"
    link = MqttLink(broker_settings(url), "lonely", lambda event: None, persistent=False)
    broker = Mosquitto(tmp_path / "late", port=port)
    link.start()
    try:
        wait_for(lambda: said(caplog, "cannot reach the broker"), 10, "the first line")
        [line] = said(caplog, "cannot reach the broker")
        assert line.startswith(f"cannot reach the broker at {url}, retrying: connection refused"), line
        assert "links of this process" not in line  # one link: no fleet arithmetic
        wait_for(lambda: said(caplog, f"still cannot reach the broker at {url} after"), 10, "the periodic line")
        assert link.connect_failures >= 2  # paho kept retrying
        assert not link.connected.is_set() and link.down_since is not None
        assert "connection refused" in link.last_error

        broker.start()
        assert link.wait_connected(10), "the link did not reach the broker once it came up"
        wait_for(lambda: said(caplog, f"reached the broker at {url} after"), 5, "the line saying it is back")
        assert link.down_since is None
        failures = link.connect_failures

        # A connection that drops and does not come back is said too.
        broker.kill()
        wait_for(lambda: len(said(caplog, f"cannot reach the broker at {url}, retrying")) == 2, 15,
                 "the line after the drop")
        assert not link.connected.is_set() and link.down_since is not None
        assert link.connect_failures > failures
        wait_for(lambda: len(said(caplog, "still cannot reach")) >= 2, 10, "the periodic line after the drop")
        broker.start()
        wait_for(lambda: len(said(caplog, f"reached the broker at {url} after")) == 2, 10, "back again")
    finally:
        link.stop()
        broker.kill()


def test_a_fleets_links_to_one_broker_share_their_lines(caplog):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    url = f"mqtt://127.0.0.1:{free_port()}"
    links = [MqttLink(broker_settings(url), f"dev-{i}", lambda event: None, persistent=False) for i in range(5)]
    for link in links:
        link.start()
    try:
        wait_for(lambda: said(caplog, "cannot reach the broker"), 10, "the first line")
        # Each retried since: still one line between them all, not one per link or per retry.
        wait_for(lambda: all(link.connect_failures >= 2 for link in links), 15, "every link retrying")
        lines = said(caplog, "cannot reach the broker")
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"cannot reach the broker at {url} (5 of 5 links of this process), retrying: "
                                   "connection refused"), lines
    finally:
        for link in links:
            link.stop()


def test_a_host_name_that_cannot_even_be_encoded_is_retried_and_named():
    # paho retries only an OSError; this one (a UnicodeError) used to end its network thread.
    link = MqttLink(broker_settings("mqtt://a..b:1883"), "odd", lambda event: None, persistent=False,
                    report_outages=False)
    link.start()
    try:
        wait_for(lambda: link.connect_failures >= 2, 10, "a retry")
        assert "idna" in link.last_error and "broker.url" in link.last_error
    finally:
        link.stop()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_the_aggregators_metrics_show_the_outage_and_its_end(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedge.mqtt")
    port = free_port()
    cfg = updated(job_config(tmp_path, f"mqtt://127.0.0.1:{port}"), metrics={"enabled": True, "port": 0})
    service = AggregatorService(cfg)
    thread = threading.Thread(target=service.run, daemon=True)
    broker = Mosquitto(tmp_path / "late", port=port)
    thread.start()
    try:
        wait_for(lambda: service.metrics.listener is not None, 30, "the metrics listener")
        metrics_port = service.metrics.listener.port
        wait_for(lambda: scrape(metrics_port).get("fedge_broker_connect_failures_total", 0) >= 2, 15,
                 "failed attempts counted")
        assert scrape(metrics_port)["fedge_broker_connected"] == 0
        assert said(caplog, f"cannot reach the broker at mqtt://127.0.0.1:{port}, retrying")
        broker.start()
        wait_for(lambda: scrape(metrics_port).get("fedge_broker_connected") == 1, 15, "connected in the metrics")
    finally:
        service.stop()
        thread.join(15)
        broker.kill()


@pytest.mark.parametrize("url, why", [
    (None, "connection refused"),  # a closed loopback port
    ("mqtt://broker.invalid:1883", "host name broker.invalid does not resolve"),
])
def test_watch_says_it_cannot_reach_the_broker_and_keeps_trying(url, why, cli_env):
    url = url or f"mqtt://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(fedge_cmd("watch", "--set", f"broker.url={url}", "--set", "broker.reconnect_max_s=2"),
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        seen = []
        while not any("cannot reach" in line for line in seen):
            seen.append(lines.get(timeout=30))  # the interpreter's start, then about a second
        [line] = [line for line in seen if "cannot reach" in line]
        assert f"cannot reach the broker at {url}, retrying: {why}" in line, seen
        assert proc.poll() is None, "watch gave up instead of retrying"
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0  # SIGTERM: it stops as asked
