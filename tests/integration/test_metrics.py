"""Prometheus metrics from a real job over a real Mosquitto, scraped over
HTTP the way Prometheus does, and checked against the job's own records."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import METRICS
from aggregator.service import AggregatorService
from edge_agent.metrics import METRICS as AGENT_METRICS
from edge_agent.metrics import AgentMetricsSettings
from fedge.config import updated

from .support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``name -> {labels: value}`` for every sample of ``GET /metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


def test_a_scrape_agrees_with_the_jobs_records(mosquitto, tmp_path):
    rounds = 3
    cfg = updated(job_config(tmp_path, mosquitto.url, rounds=rounds, agents=3),
                  metrics={"enabled": True, "port": 0})
    scrapes: dict[int, dict] = {}
    records: list = []
    ports: list[int] = []
    service: AggregatorService

    def on_record(record) -> None:
        records.append(record)
        # On the aggregator's own loop: the listener answers from its own thread.
        ports.append(service.metrics.listener.port)
        scrapes[record.round] = scrape(ports[-1])

    service = AggregatorService(cfg, on_record=on_record)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        with running_fleet(devices(tmp_path, "itest", 3), cfg.broker):
            assert service.done.wait(90), f"job did not finish: {records}"
            # The end is a state: the service stays up, and a scrape after it sees it (issue 26, item 4).
            wait_for(lambda: value(scrape(ports[-1]), "fedge_job_done") == 1, 10, "fedge_job_done 1")
            time.sleep(1.5)
            assert thread.is_alive() and value(scrape(ports[-1]), "fedge_job_done") == 1
    finally:
        service.stop()
        thread.join(15)
    assert [r.round for r in records] == [1, 2, 3] and all(r.status == "ok" for r in records)
    last = scrapes[rounds]
    assert value(last, "fedge_job_info", job_name="itest", model=cfg.job.model, version="0.1.0") == 1
    assert value(last, "fedge_round") == rounds
    assert value(last, "fedge_rounds_planned") == rounds
    assert value(last, "fedge_rounds_total", outcome="ok") == rounds
    assert value(last, "fedge_rounds_total", outcome="failed") == 0
    assert value(last, "fedge_updates_total", status="accepted") == sum(r.clients for r in records) == 9
    assert value(last, "fedge_updates_total", status="rejected") == 0
    assert value(last, "fedge_clients_online") == 3
    assert value(last, "fedge_broker_connected") == 1
    assert value(last, "fedge_broker_connect_failures_total") == 0
    assert value(last, "fedge_clients_known") == 3
    # Uplink: every update's bytes arrived on the update channel (plus chunk headers).
    up = value(last, "fedge_transport_bytes_total", direction="in", channel="update")
    assert sum(r.bytes_up for r in records) <= up < sum(r.bytes_up for r in records) + 9 * 1024
    assert value(last, "fedge_transport_bytes_total", direction="out", channel="key") > 0
    assert value(last, "fedge_transport_messages_total", direction="in", channel="status") >= 3
    assert value(last, "fedge_model_accuracy") == pytest.approx(records[-1].accuracy)
    assert 0 <= value(last, "fedge_checkpoint_age_seconds") < 30
    assert value(last, "fedge_update_fold_seconds_count") == 9
    assert value(last, "fedge_round_duration_seconds_count") == rounds
    assert value(last, "fedge_round_duration_seconds_sum") == pytest.approx(sum(r.seconds for r in records), rel=1e-3)
    assert value(last, "fedge_round_close_seconds_count") == rounds
    assert value(last, "fedge_evaluation_seconds_count") == rounds
    assert "process_resident_memory_bytes" in last
    # Counters only grow between scrapes.
    assert value(scrapes[1], "fedge_rounds_total", outcome="ok") == 1
    assert value(scrapes[1], "fedge_updates_total", status="accepted") == 3
    # Every documented metric that this job has a value for is served.
    for name, (kind, _, _) in METRICS.items():
        if name.startswith(("fedge_privacy", "fedge_buffered")):
            continue  # privacy is off here (test_privacy_job), and the rounds synchronous (tests/unit/test_buffered)
        sample = name + ("_count" if kind == "histogram" else "")
        if kind == "counter" and not any(k for k in last.get(name, {})) and name not in last:
            continue  # a labelled counter with no label seen yet (no failures, no incidents)
        assert sample in last, f"{sample} is documented but not served"
    # The listener is gone with the service.
    with pytest.raises(OSError):
        scrape(ports[-1])


def test_an_agents_scrape_counts_its_rounds_receipts_and_training(mosquitto, tmp_path):
    cfg = job_config(tmp_path, mosquitto.url, rounds=2, agents=3)
    settings = AgentMetricsSettings(enabled=True, port=0)
    with running_aggregator(cfg) as (service, records), \
            running_fleet(devices(tmp_path, "itest", 3), cfg.broker, metrics=settings) as fleet:
        assert service.done.wait(90), f"job did not finish: {records}"
        port = fleet.metrics.listener.port
        # Receipts reach the devices after the aggregator closes the round.
        wait_for(lambda: value(scrape(port), "fedge_agent_receipts_total", status="accepted") == 6, 20,
                 "six receipts")
        metrics = scrape(port)
    assert value(metrics, "fedge_agent_devices") == 3
    assert value(metrics, "fedge_agent_connected") == 3
    assert value(metrics, "fedge_broker_connected") == 1
    assert value(metrics, "fedge_broker_connect_failures_total") == 0
    assert value(metrics, "fedge_agent_info", device="dev-1", job_name="itest", role="trainer",
                 version="0.1.0") == 1
    assert value(metrics, "fedge_agent_rounds_trained_total") == 6
    assert value(metrics, "fedge_agent_declines_total") == 0
    assert value(metrics, "fedge_agent_training_seconds_count") == 6
    assert 0 < value(metrics, "fedge_agent_last_training_seconds") < 60
    assert value(metrics, "fedge_agent_last_training_samples") > 0
    # The worker holds PyTorch while it trains: far more than the idle agent.
    assert value(metrics, "fedge_agent_worker_max_rss_bytes") > 100 << 20
    sent = value(metrics, "fedge_agent_transport_bytes_total", direction="out", channel="update")
    assert sum(r["bytes_up"] for r in records) <= sent
    assert value(metrics, "fedge_agent_transport_bytes_total", direction="in", channel="round") > 0
    for name, (kind, _, _) in AGENT_METRICS.items():
        sample = name + ("_count" if kind == "histogram" else "")
        if name == "fedge_agent_events_total":
            continue  # labelled by kind: none may have happened
        assert sample in metrics, f"{sample} is documented but not served"
