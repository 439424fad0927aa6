"""The edge agent's Prometheus metrics (``[metrics]`` in the agent's config;
off by default, loopback when on).

The runtime's loop builds a snapshot (``AgentRuntime._metrics_snapshot``)
and this module renders it; the HTTP listener's thread never touches a
device's state. A runtime that simulates several devices (``fedge fleet``)
sums them, and says how many there are (``fedge_agent_devices``).

Every metric is listed in ``METRICS`` and in the documentation's metrics
reference (docs/reference/metrics.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fedge.config import setting
from fedge.metrics import SLOW_BUCKETS, Families, MetricsSettings, MetricTable, ServiceMetrics


@dataclass(frozen=True)
class AgentMetricsSettings(MetricsSettings):
    port: int = setting(9465, "TCP port to listen on (the aggregator's default is 9464); 0 picks a free one.")


# Counter keys of ``AgentCore.counters`` with families of their own.
_RECEIPTS = {"update_accepted": "accepted", "update_duplicate": "duplicate", "update_rejected": "rejected",
             "update_late": "late"}
_OWN = {"updates_sent", "declined", "training_failed", *_RECEIPTS}

METRICS: MetricTable = {
    "fedge_agent_info": ("gauge", "This device (value 1).", ("device", "job_name", "role", "version")),
    "fedge_agent_devices": ("gauge", "Devices this process runs (1, or a simulated fleet's size).", ()),
    "fedge_agent_connected": ("gauge", "Devices connected to the broker now.", ()),
    "fedge_broker_connected": ("gauge", "1 while every device of this process is connected to the broker, 0 "
                               "while one is not.", ()),
    "fedge_broker_connect_failures_total": ("counter", "Connection attempts to the broker that failed (refused, "
                                            "host name not resolved, TLS, credentials refused), all devices "
                                            "together.", ()),
    "fedge_broker_messages_dropped_total": ("counter", "Messages given up because the broker was unreachable and "
                                            "broker.max_queued_messages were already queued, all devices "
                                            "together.", ()),
    "fedge_broker_subscriptions_refused_total": ("counter", "Subscriptions the broker refused in its SUBACK (its "
                                                 "ACL, or a broker that could not set one up), all devices "
                                                 "together; each is asked for again.", ()),
    "fedge_agent_rounds_trained_total": ("counter", "Updates trained and sent (one per round taken part in).", ()),
    "fedge_agent_declines_total": ("counter", "Rounds declined (training failed, or its update could not be "
                                   "made).", ()),
    "fedge_agent_training_failures_total": ("counter", "Training runs that failed.", ()),
    "fedge_agent_receipts_total": ("counter", "Receipts from the aggregator, by status (accepted, duplicate, rejected, "
                                   "late).",
                                   ("status",)),
    "fedge_agent_events_total": ("counter", "Other things the device counted (refused messages, resends, "
                                 "stale training, ...), by kind.", ("kind",)),
    "fedge_agent_transport_bytes_total": ("counter", "MQTT payload bytes, by direction (in, out) and channel.",
                                          ("direction", "channel")),
    "fedge_agent_transport_messages_total": ("counter", "MQTT messages (chunks), by direction and channel.",
                                             ("direction", "channel")),
    "fedge_agent_last_training_seconds": ("gauge", "How long the last training run took.", ()),
    "fedge_agent_last_training_timestamp_seconds": ("gauge", "Unix time the last training run ended.", ()),
    "fedge_agent_last_training_samples": ("gauge", "Examples the last training run used.", ()),
    "fedge_agent_worker_max_rss_bytes": ("gauge", "Peak resident memory of the training worker in its last run "
                                         "(per_round: that run's; warm: the worker's so far).", ()),
    "fedge_agent_training_seconds": ("histogram", "Time a training run took.", ()),
}


def render(snap: dict[str, Any]) -> Iterator[Any]:
    f = Families(METRICS)
    gauge, counter = f.gauge, f.counter
    yield f.gauges("fedge_agent_info", (([device, job, role, snap["version"]], 1.0)
                                        for device, job, role in snap["devices"]))
    yield gauge("fedge_agent_devices", len(snap["devices"]))
    yield gauge("fedge_agent_connected", snap["connected"])
    yield gauge("fedge_broker_connected", 1 if snap["broker_connected"] else 0)
    yield counter("fedge_broker_connect_failures_total", {"": snap["broker_connect_failures"]})
    yield counter("fedge_broker_messages_dropped_total", {"": snap.get("broker_messages_dropped", 0)})
    yield counter("fedge_broker_subscriptions_refused_total", {"": snap.get("broker_subscriptions_refused", 0)})
    counters: dict[str, int] = snap["counters"]
    yield counter("fedge_agent_rounds_trained_total", {"": counters.get("updates_sent", 0)})
    yield counter("fedge_agent_declines_total", {"": counters.get("declined", 0)})
    yield counter("fedge_agent_training_failures_total", {"": counters.get("training_failed", 0)})
    yield counter("fedge_agent_receipts_total", {s: counters.get(k, 0) for k, s in _RECEIPTS.items()})
    yield counter("fedge_agent_events_total", {k: v for k, v in counters.items() if k not in _OWN})
    traffic_bytes, traffic_messages = snap["traffic"]
    yield counter("fedge_agent_transport_bytes_total", traffic_bytes)
    yield counter("fedge_agent_transport_messages_total", traffic_messages)
    last = snap["last_training"]
    yield gauge("fedge_agent_last_training_seconds", last.get("seconds"))
    yield gauge("fedge_agent_last_training_timestamp_seconds", last.get("time"))
    yield gauge("fedge_agent_last_training_samples", last.get("samples"))
    yield gauge("fedge_agent_worker_max_rss_bytes", last.get("max_rss_bytes"))


class AgentMetrics(ServiceMetrics):
    def __init__(self, settings: MetricsSettings) -> None:
        super().__init__(settings, METRICS, render, "agent")
        self.training_seconds = self.histogram("fedge_agent_training_seconds", SLOW_BUCKETS)
