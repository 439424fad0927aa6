"""The Grafana dashboard in deploy/grafana: it is what its builder writes,
and every query on it runs on a real Prometheus that scrapes a real job's
aggregator and agents over a real Mosquitto, with data where a healthy job
has some."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from edge_agent.metrics import AgentMetricsSettings
from fedge.config import updated
from tests.conftest import free_port

from .support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration
GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"

# Panels that a healthy, non-private job shows data on within a few rounds.
MUST_HAVE_DATA = {
    "Round", "Held-out accuracy", "Devices online", "Checkpoint age", "Rounds per hour", "Accuracy and loss",
    "Round duration", "Devices", "Round close (checkpoint, publish)", "Updates by receipt", "Fold latency",
    "Evaluation time", "Reassembly memory", "MQTT bytes by channel", "Aggregator memory", "Aggregator CPU",
    "Rounds trained per hour", "Receipts by status", "Declines and training failures", "Last training time",
    "Training worker peak memory", "Agent memory (idle: no PyTorch)",
}


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_file_is_what_its_builder_writes():
    assert (GRAFANA / "fedge.json").read_text() == _builder().render(), \
        "run python deploy/grafana/build_dashboard.py after editing it"


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # a query Prometheus cannot parse: 400 with the reason
        body = exc.read()
    try:
        return json.loads(body)
    except ValueError:  # still starting: 503 "Service Unavailable" in plain text
        return {"status": "error", "error": body.decode(errors="replace").strip()}


def _expr(text: str) -> str:
    return (text.replace("$aggregator", ".*").replace("$agent", ".*").replace("$__rate_interval", "30s"))


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus (Debian's; .ci/run installs it)")
def test_every_panel_query_runs_on_a_real_prometheus_scraping_a_real_job(mosquitto, tmp_path):
    dashboard = json.loads((GRAFANA / "fedge.json").read_text())
    cfg = updated(job_config(tmp_path, mosquitto.url, rounds=200, agents=3), metrics={"enabled": True, "port": 0})
    with running_aggregator(cfg) as (service, records), \
            running_fleet(devices(tmp_path, "itest", 3), cfg.broker,
                          metrics=AgentMetricsSettings(enabled=True, port=0)) as fleet:
        wait_for(lambda: service.metrics.listener is not None and records, 60, "the first round")
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
            f"  - job_name: fedge-aggregator\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{service.metrics.listener.port}']\n"
            f"  - job_name: fedge-agents\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{fleet.metrics.listener.port}']\n")
        log = (tmp_path / "prometheus.log").open("w")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=log)
        try:
            def scraped_rounds() -> float:
                try:
                    answer = _query(prom_port, "max(fedge_rounds_total)")
                except OSError:  # not listening yet
                    return 0
                if answer.get("status") != "success":
                    return 0
                result = answer["data"]["result"]
                return float(result[0]["value"][1]) if result else 0

            wait_for(lambda: scraped_rounds() >= 4, 120, "Prometheus to see four rounds")
            time.sleep(2)  # a few more scrapes of the agents too
            failures, empty = [], []
            for p in dashboard["panels"]:
                for t in p.get("targets", []):
                    answer = _query(prom_port, _expr(t["expr"]))
                    if answer.get("status") != "success":
                        failures.append((p["title"], t["expr"], answer.get("error")))
                    elif not answer["data"]["result"] and p["title"] in MUST_HAVE_DATA:
                        empty.append((p["title"], t["expr"]))
            for var in dashboard["templating"]["list"][1:]:
                metric = var["definition"].split("(")[1].split(",")[0]
                values = _query(prom_port, f"count by (instance) ({metric})")["data"]["result"]
                assert values, f"variable {var['name']}: no instance has {metric}"
        finally:
            prom.terminate()
            prom.wait(20)
            log.close()
    assert not failures, failures
    assert not empty, empty
    assert set(MUST_HAVE_DATA) <= {p["title"] for p in dashboard["panels"]}
