"""Metrics settings, the listener's failures, and how a snapshot becomes
metric families (the real scrape of a real job: tests/integration/test_metrics.py)."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.config import AggregatorConfig
from aggregator.metrics import render
from edge_agent.config import AgentConfig
from fedge.config import ConfigError, render_defaults, updated
from fedge.metrics import MetricsListener, MetricsSettings, SnapshotCollector, _loopback


@pytest.mark.parametrize("change, words", [
    ({"port": 70000}, "metrics.port = 70000 is not a TCP port"),
    ({"port": -1}, "is not a TCP port"),
    ({"host": ""}, "metrics.host is empty"),
    ({"cert_file": "/etc/hostname"}, "go together"),
    ({"enabled": True, "cert_file": "/nonexistent.pem", "key_file": "/nonexistent.key"}, "not a readable file"),
])
def test_bad_settings_get_one_line_naming_the_key(change, words):
    with pytest.raises(ConfigError, match=words):
        updated(AggregatorConfig(), metrics=change).check()


def test_metrics_are_off_by_default_and_loopback_when_on():
    for cfg, port in ((AggregatorConfig(), 9464), (AgentConfig(), 9465)):
        assert cfg.metrics.enabled is False
        assert cfg.metrics.host == "127.0.0.1"
        assert cfg.metrics.port == port
    assert "[metrics]" in render_defaults(AggregatorConfig) and "[metrics]" in render_defaults(AgentConfig)


def test_only_loopback_hosts_count_as_loopback():
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.1.10") and not _loopback("metrics.example")


def test_a_port_already_taken_is_one_config_error():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve aggregator metrics on 127.0.0.1:{port}.*metrics.port"):
            MetricsListener(MetricsSettings(enabled=True, port=port), CollectorRegistry(), "aggregator")


def _snapshot(**changes):
    snap = {
        "job": "j", "model": "m:f", "version": "0.1.0", "round": 4, "rounds_planned": 10, "done": False,
        # "unknown_sender" was counted once as a rejection and twice as an
        # incident (a presence that failed its signature check).
        "counters": {"rounds_ok": 3, "rounds_failed": 1, "accepted": 7, "duplicate": 2, "declined": 1,
                     "late": 2, "stale_base": 1, "unknown_sender": 3, "rate_limited": 5,
                     "secagg_failed": 1},
        "rejections": {"late": 2, "stale_base": 1, "unknown_sender": 1},
        "failures": {"secagg_failed": 1},
        "traffic": ({("in", "update"): 1000}, {("in", "update"): 3}),
        "broker_connected": True, "broker_connect_failures": 0,
        "clients_online": 5, "clients_known": 6, "clients_selected": 4, "clients_responded": 2,
        "clients_benched": 1, "reassembly_bytes": 0, "reassembly_limit_bytes": 1 << 20, "inbox_messages": 0,
        "last": {"accuracy": 0.9, "loss": None, "train_loss": 0.3}, "checkpoint_time": None,
    }
    snap.update(changes)
    return snap


def _scrape(snap) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    collector = SnapshotCollector(render)
    registry.register(collector)
    collector.publish(snap)
    out: dict = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_snapshot_sorts_every_count_into_one_family():
    m = _scrape(_snapshot())
    assert m[("fedge_rounds_total", (("outcome", "ok"),))] == 3
    assert m[("fedge_rounds_total", (("outcome", "failed"),))] == 1
    assert m[("fedge_round_failures_total", (("reason", "secagg_failed"),))] == 1
    updates = {labels[0][1]: v for (name, labels), v in m.items() if name == "fedge_updates_total"}
    assert updates == {"accepted": 7, "duplicate": 2, "declined": 1, "late": 2, "rejected": 2}
    assert m[("fedge_updates_rejected_total", (("reason", "unknown_sender"),))] == 1
    incidents = {labels[0][1]: v for (name, labels), v in m.items() if name == "fedge_incidents_total"}
    assert incidents == {"rate_limited": 5, "unknown_sender": 2}  # nothing counted twice
    assert m[("fedge_model_accuracy", ())] == 0.9
    assert ("fedge_model_loss", ()) not in m  # not evaluated: no sample rather than a made-up 0
    assert not any(name.startswith("fedge_privacy") or name.startswith("fedge_checkpoint") for name, _ in m)


def test_the_broker_connection_is_a_gauge_and_its_failed_attempts_a_counter():
    m = _scrape(_snapshot())
    assert m[("fedge_broker_connected", ())] == 1 and m[("fedge_broker_connect_failures_total", ())] == 0
    m = _scrape(_snapshot(broker_connected=False, broker_connect_failures=7))
    assert m[("fedge_broker_connected", ())] == 0 and m[("fedge_broker_connect_failures_total", ())] == 7


def test_privacy_and_checkpoint_age_appear_when_there_is_something_to_say():
    m = _scrape(_snapshot(privacy={"epsilon": 1.5, "epsilon_participant": 2.0, "budget": 8.0, "delta": 1e-5},
                          checkpoint_time=1.0))
    assert m[("fedge_privacy_epsilon", ())] == 1.5
    assert m[("fedge_privacy_epsilon_budget", ())] == 8.0
    assert m[("fedge_checkpoint_timestamp_seconds", ())] == 1.0
    assert m[("fedge_checkpoint_age_seconds", ())] > 1e9


def test_no_snapshot_yet_serves_no_fedge_metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(render))
    assert b"fedge_" not in generate_latest(registry)


def test_every_metric_is_documented_on_the_generated_reference_page():
    """The metrics reference (docs/reference/metrics.md) is generated from the
    METRICS tables: each metric needs a help text to be worth a row, labels
    that are valid names, and a row under its role with its type and help."""
    import importlib.util
    import re
    from pathlib import Path

    from aggregator.metrics import METRICS as AGGREGATOR
    from edge_agent.metrics import METRICS as AGENT

    path = Path(__file__).resolve().parents[2] / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("fedge_docs_reference", path)
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    page = reference.metrics_page()
    for role, table in (("aggregator", AGGREGATOR), ("agent", AGENT)):
        section = page.split(f"{{#{role}}}", 1)[1].split("\n## ", 1)[0]
        rows = {line.split(" | ")[0].strip("| `"): line for line in section.splitlines() if line.startswith("| `")}
        assert set(rows) == set(table), f"{role}: the page's rows are not METRICS"
        for name, (kind, helptext, labels) in table.items():
            assert kind in ("gauge", "counter", "histogram"), name
            assert helptext.strip().endswith("."), f"{name}: a help text, one sentence or more"
            assert all(re.fullmatch(r"[a-z][a-z_]*", label) for label in labels), f"{name}: label names {labels}"
            row = rows[name]
            assert f"| {kind} |" in row and reference.md(helptext) in row, row
            assert all(f"`{label}`" in row for label in labels), row
            assert name.startswith("fedge_") and (name.endswith("_total") == (kind == "counter")), name
            assert "device" not in labels or name == "fedge_agent_info", f"{name}: one series per device"
