"""Writes deploy/grafana/fedge.json, the Grafana dashboard for fedge's
Prometheus metrics (docs/how-to/monitoring.md). Edit the panels here and run

    python deploy/grafana/build_dashboard.py

tests/integration/test_dashboard.py checks that the file is what this
script writes, and runs every query against a real Prometheus that scraped
a real job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("fedge.json")
AGG = 'instance=~"$aggregator"'
AGENT = 'instance=~"$agent"'
RATE = "$__rate_interval"

def target(expr: str, legend: str = "") -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend,
            "refId": "ABCDEFGH"[0]}


def panel(kind: str, title: str, targets: list[dict[str, Any]], x: int, y: int, w: int = 8, h: int = 8,
          unit: str = "short", description: str = "", **options: Any) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = "ABCDEFGH"[i]
    p: dict[str, Any] = {
        "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": options or {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                  "showPoints": "never"}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"},
                        **(options or {})}
    return p


def row(title: str, y: int) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def quantiles(metric: str, sel: str) -> list[dict[str, Any]]:
    return [target(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{sel}}}[{RATE}])))", f"p{p}")
            for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))]


def dashboard() -> dict[str, Any]:
    stat = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value",
            "graphMode": "area", "textMode": "auto"}
    panels = [
        row("Job", 0),
        panel("stat", "Round", [target(f"max(fedge_round{{{AGG}}})", "round"),
                                target(f"max(fedge_rounds_planned{{{AGG}}})", "planned")], 0, 1, 4, 4, **stat),
        panel("stat", "Held-out accuracy", [target(f"max(fedge_model_accuracy{{{AGG}}})")], 4, 1, 4, 4,
              unit="percentunit", **stat),
        panel("stat", "Devices online", [target(f"max(fedge_clients_online{{{AGG}}})", "online"),
                                         target(f"max(fedge_clients_known{{{AGG}}})", "known")], 8, 1, 4, 4, **stat),
        panel("stat", "Checkpoint age", [target(f"max(fedge_checkpoint_age_seconds{{{AGG}}})")], 12, 1, 4, 4,
              unit="s", description="Time since the last round's checkpoint: it grows when rounds stop closing.",
              **stat),
        panel("stat", "Epsilon spent", [target(f"max(fedge_privacy_epsilon{{{AGG}}})", "epsilon"),
                                        target(f"max(fedge_privacy_epsilon_budget{{{AGG}}})", "budget")],
              16, 1, 4, 4, description="Differential privacy: empty when the job is not private.", **stat),
        panel("stat", "Failed rounds (24 h)",
              [target(f'sum(increase(fedge_rounds_total{{{AGG}, outcome="failed"}}[24h]))')], 20, 1, 4, 4,
              **stat),
        row("Rounds", 5),
        panel("timeseries", "Rounds per hour", [
            target(f"sum by (outcome) (rate(fedge_rounds_total{{{AGG}}}[{RATE}])) * 3600", "{{outcome}}")], 0, 6),
        panel("timeseries", "Accuracy and loss", [
            target(f"max(fedge_model_accuracy{{{AGG}}})", "accuracy"),
            target(f"max(fedge_model_loss{{{AGG}}})", "held-out loss"),
            target(f"max(fedge_train_loss{{{AGG}}})", "training loss")], 8, 6),
        panel("timeseries", "Round duration", quantiles("fedge_round_duration_seconds", AGG), 16, 6, unit="s"),
        panel("timeseries", "Devices", [
            target(f"max(fedge_clients_online{{{AGG}}})", "online"),
            target(f"max(fedge_clients_selected{{{AGG}}})", "selected"),
            target(f"max(fedge_clients_responded{{{AGG}}})", "responded"),
            target(f"max(fedge_clients_benched{{{AGG}}})", "sitting out")], 0, 14),
        panel("timeseries", "Round failures by reason", [
            target(f"sum by (reason) (rate(fedge_round_failures_total{{{AGG}}}[{RATE}])) * 3600", "{{reason}}")],
              8, 14, description="Per hour."),
        panel("timeseries", "Round close (checkpoint, publish)", quantiles("fedge_round_close_seconds", AGG), 16, 14,
              unit="s"),
        row("Updates", 22),
        panel("timeseries", "Updates by receipt", [
            target(f"sum by (status) (rate(fedge_updates_total{{{AGG}}}[{RATE}]))", "{{status}}")], 0, 23,
              unit="reqps"),
        panel("timeseries", "Refused updates by reason", [
            target(f"sum by (reason) (rate(fedge_updates_rejected_total{{{AGG}}}[{RATE}]))", "{{reason}}")], 8, 23,
              unit="reqps"),
        panel("timeseries", "Incidents by kind", [
            target(f"sum by (kind) (rate(fedge_incidents_total{{{AGG}}}[{RATE}]))", "{{kind}}")], 16, 23,
              unit="reqps", description="Rate-limited devices, bad presence, dropped chunks, internal errors ..."),
        panel("timeseries", "Fold latency", quantiles("fedge_update_fold_seconds", AGG), 0, 31, unit="s"),
        panel("timeseries", "Evaluation time", quantiles("fedge_evaluation_seconds", AGG), 8, 31, unit="s"),
        panel("timeseries", "Reassembly memory", [
            target(f"max(fedge_reassembly_bytes{{{AGG}}})", "held"),
            target(f"max(fedge_reassembly_limit_bytes{{{AGG}}})", "limit")], 16, 31, unit="bytes"),
        row("Traffic and resources", 39),
        panel("timeseries", "MQTT bytes by channel", [
            target(f"sum by (direction, channel) (rate(fedge_transport_bytes_total{{{AGG}}}[{RATE}]))",
                   "{{direction}} {{channel}}")], 0, 40, unit="Bps"),
        panel("timeseries", "Aggregator memory", [
            target(f"max(process_resident_memory_bytes{{{AGG}}})", "resident")], 8, 40, unit="bytes"),
        panel("timeseries", "Aggregator CPU", [
            target(f"max(rate(process_cpu_seconds_total{{{AGG}}}[{RATE}]))", "cores")], 16, 40, unit="short"),
        row("Agents", 48),
        panel("timeseries", "Rounds trained per hour", [
            target(f"sum by (instance) (rate(fedge_agent_rounds_trained_total{{{AGENT}}}[{RATE}])) * 3600",
                   "{{instance}}")], 0, 49),
        panel("timeseries", "Receipts by status", [
            target(f"sum by (status) (rate(fedge_agent_receipts_total{{{AGENT}}}[{RATE}]))", "{{status}}")],
              8, 49, unit="reqps"),
        panel("timeseries", "Declines and training failures", [
            target(f"sum(rate(fedge_agent_declines_total{{{AGENT}}}[{RATE}]))", "declined"),
            target(f"sum(rate(fedge_agent_training_failures_total{{{AGENT}}}[{RATE}]))", "training failed")],
              16, 49, unit="reqps"),
        panel("timeseries", "Last training time", [
            target(f"max by (instance) (fedge_agent_last_training_seconds{{{AGENT}}})", "{{instance}}")], 0, 57,
              unit="s"),
        panel("timeseries", "Training worker peak memory", [
            target(f"max by (instance) (fedge_agent_worker_max_rss_bytes{{{AGENT}}})", "{{instance}}")], 8, 57,
              unit="bytes"),
        panel("timeseries", "Agent memory (idle: no PyTorch)", [
            target(f"max by (instance) (process_resident_memory_bytes{{{AGENT}}})", "{{instance}}")], 16, 57,
              unit="bytes"),
    ]

    for i, p in enumerate(panels, 1):
        p["id"] = i

    def variable(name: str, label: str, metric: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus",
                                                                               "uid": "${datasource}"},
                "query": {"query": f"label_values({metric}, instance)", "refId": "var"},
                "definition": f"label_values({metric}, instance)", "refresh": 2, "includeAll": True,
                "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "sort": 1}

    return {
        "title": "fedge: federated learning fleet",
        "uid": "fedge-fleet",
        "description": "fedge's Prometheus metrics: one aggregator's job and its agents (docs/how-to/monitoring.md).",
        "tags": ["fedge", "federated-learning", "mqtt"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "refresh": 1},
            variable("aggregator", "Aggregator", "fedge_job_info"),
            variable("agent", "Agents", "fedge_agent_info"),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
