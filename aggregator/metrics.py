"""The aggregator's Prometheus metrics (``[metrics]`` in the job's config).

``AggregatorMetrics`` owns a registry of its own (never the process-wide
default, so two services in one process do not mix), the latency
histograms the service observes, and a ``SnapshotCollector`` that renders
``snapshot`` dicts the service's loop builds (``AggregatorService._metrics_snapshot``).

Every metric and its labels are listed in ``METRICS`` and in the
documentation's metrics reference (docs/reference/metrics.md);
``tests/unit/test_metrics.py`` checks that they agree with what a scrape
returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedge.metrics import FAST_BUCKETS, SLOW_BUCKETS, Families, MetricsSettings, MetricTable, ServiceMetrics

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.rounds import RoundCore
    from fedge.records import RoundRecord

# Counter keys of ``RoundCore.counters`` that have families of their own.
_OUTCOMES = {"rounds_ok": "ok", "rounds_failed": "failed"}
_UPDATE_STATUSES = ("accepted", "duplicate", "declined")
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
# Histograms rendered from the snapshot (counts by value), not observed into the registry: (unit, buckets).
SNAPSHOT_HISTOGRAMS = {"fedge_buffered_staleness": ("versions", STALENESS_BUCKETS)}

# name -> (type, help, labels): the public surface, documented in docs/reference/metrics.md.
METRICS: MetricTable = {
    "fedge_job_info": ("gauge", "The job this aggregator runs (value 1).", ("job_name", "model", "version")),
    "fedge_round": ("gauge", "The round open now, or the last one closed.", ()),
    "fedge_rounds_planned": ("gauge", "Rounds the job runs (job.rounds).", ()),
    "fedge_job_done": ("gauge", "1 once the job has ended (its last round, or a privacy budget).", ()),
    "fedge_rounds_total": ("counter", "Rounds closed, by outcome (ok, failed).", ("outcome",)),
    "fedge_round_failures_total": ("counter", "Failed rounds, by reason.", ("reason",)),
    "fedge_updates_total": ("counter", "Updates by receipt status (accepted, rejected, late, duplicate, declined).",
                            ("status",)),
    "fedge_updates_rejected_total": ("counter", "Refused updates, by reason.", ("reason",)),
    "fedge_incidents_total": ("counter", "Other things the aggregator counted and dropped or survived, by kind "
                              "(rate_limited, bad_status, chunk_*, internal_error, ...).", ("kind",)),
    "fedge_transport_bytes_total": ("counter", "MQTT payload bytes, by direction (in, out) and channel.",
                                    ("direction", "channel")),
    "fedge_transport_messages_total": ("counter", "MQTT messages (chunks), by direction and channel.",
                                       ("direction", "channel")),
    "fedge_broker_connected": ("gauge", "1 while connected to the broker, 0 while not.", ()),
    "fedge_broker_connect_failures_total": ("counter", "Connection attempts to the broker that failed (refused, "
                                            "host name not resolved, TLS, credentials refused).", ()),
    "fedge_broker_messages_dropped_total": ("counter", "Messages given up because the broker was unreachable and "
                                            "broker.max_queued_messages were already queued.", ()),
    "fedge_aggregator_cpu_seconds_total": ("counter", "The aggregator's CPU time by stage: its main thread's "
                                           "(receive, verify, update, presence, round, publish, records, save, "
                                           "evaluate, other), its MQTT thread's (mqtt) and the rest of the "
                                           "process's (other_threads).", ("stage",)),
    "fedge_broker_subscriptions_refused_total": ("counter", "Subscriptions the broker refused in its SUBACK (its "
                                                 "ACL, or a broker that could not set one up); each is asked "
                                                 "for again.", ()),
    "fedge_clients_online": ("gauge", "Devices whose presence says online.", ()),
    "fedge_clients_known": ("gauge", "Devices that ever announced themselves to this job.", ()),
    "fedge_clients_selected": ("gauge", "Devices selected for the open round (0 between rounds).", ()),
    "fedge_clients_responded": ("gauge", "Updates accepted in the open round so far.", ()),
    "fedge_clients_benched": ("gauge", "Devices sitting out rounds for not responding.", ()),
    "fedge_reassembly_bytes": ("gauge", "Bytes held for updates still arriving in chunks.", ()),
    "fedge_reassembly_limit_bytes": ("gauge", "limits.reassembly_bytes.", ()),
    "fedge_inbox_messages": ("gauge", "Messages waiting for the aggregator's loop.", ()),
    "fedge_model_accuracy": ("gauge", "Held-out accuracy of the last evaluated global model (0..1).", ()),
    "fedge_model_loss": ("gauge", "Held-out loss of the last evaluated global model.", ()),
    "fedge_train_loss": ("gauge", "Mean training loss the devices reported in the last round.", ()),
    "fedge_privacy_epsilon": ("gauge", "Epsilon the job has spent (privacy on).", ()),
    "fedge_privacy_epsilon_participant": ("gauge", "The worst device's epsilon, no secret sampling assumed.", ()),
    "fedge_privacy_epsilon_budget": ("gauge", "privacy.target_epsilon; the job stops before it (0: none).", ()),
    "fedge_privacy_delta": ("gauge", "The delta of (epsilon, delta).", ()),
    "fedge_buffered_concurrency": ("gauge", "A buffered job: devices it keeps training at once "
                                   "(buffered.concurrency).", ()),
    "fedge_buffered_training": ("gauge", "A buffered job: devices asked to train that hold a place now (not "
                                "expired, not offline).", ()),
    "fedge_buffered_buffer_updates": ("gauge", "A buffered job: updates in the version being built "
                                      "(buffered.buffer_size make a version).", ()),
    "fedge_buffered_staleness": ("histogram", "A buffered job: versions between the model an update was trained "
                                 "from and the version it was folded into, per folded update.", ()),
    "fedge_checkpoint_timestamp_seconds": ("gauge", "Unix time of the last checkpoint written.", ()),
    "fedge_checkpoint_age_seconds": ("gauge", "Seconds since the last checkpoint written.", ()),
    "fedge_update_fold_seconds": ("histogram", "Time to check and fold one accepted update.", ()),
    "fedge_round_close_seconds": ("histogram", "Time from the round's close to its checkpoint and new model "
                                  "published (evaluation excluded).", ()),
    "fedge_round_duration_seconds": ("histogram", "Time a round was open.", ()),
    "fedge_evaluation_seconds": ("histogram", "Time to evaluate a new global model.", ()),
}


def incident_counts(snap: dict[str, Any]) -> dict[str, int]:
    """Everything else the core counted: what is not an outcome, a status, a
    rejection or a failed round (a reason may be counted as more than one:
    ``model_unavailable`` is a device's decline here and a round's failure in
    ``fedge_round_failures_total``)."""
    counters, rejections, failures = snap["counters"], snap["rejections"], snap["failures"]
    own = set(_OUTCOMES) | set(_UPDATE_STATUSES)
    incidents = {k: v - rejections.get(k, 0) - failures.get(k, 0) for k, v in counters.items() if k not in own}
    return {k: v for k, v in incidents.items() if v > 0}


def render(snap: dict[str, Any]) -> Iterator[Any]:
    """Metric families from a snapshot (``AggregatorService._metrics_snapshot``)."""
    f = Families(METRICS)
    gauge, counter = f.gauge, f.counter

    yield gauge("fedge_job_info", 1, {"job_name": snap["job"], "model": snap["model"], "version": snap["version"]})
    yield gauge("fedge_round", snap["round"])
    yield gauge("fedge_rounds_planned", snap["rounds_planned"])
    yield gauge("fedge_job_done", 1 if snap["done"] else 0)
    counters: dict[str, int] = snap["counters"]
    rejections: dict[str, int] = snap["rejections"]
    failures: dict[str, int] = snap["failures"]
    yield counter("fedge_rounds_total", {o: counters.get(k, 0) for k, o in _OUTCOMES.items()})
    yield counter("fedge_round_failures_total", failures)
    statuses = {s: counters.get(s, 0) for s in _UPDATE_STATUSES}
    statuses["late"] = rejections.get("late", 0)
    statuses["rejected"] = sum(v for k, v in rejections.items() if k != "late")
    yield counter("fedge_updates_total", statuses)
    yield counter("fedge_updates_rejected_total", {k: v for k, v in rejections.items() if k != "late"})
    yield counter("fedge_incidents_total", incident_counts(snap))
    traffic_bytes, traffic_messages = snap["traffic"]
    yield counter("fedge_transport_bytes_total", traffic_bytes)
    yield counter("fedge_transport_messages_total", traffic_messages)
    yield gauge("fedge_broker_connected", 1 if snap["broker_connected"] else 0)
    yield counter("fedge_broker_connect_failures_total", {"": snap["broker_connect_failures"]})
    yield counter("fedge_broker_messages_dropped_total", {"": snap.get("broker_messages_dropped", 0)})
    yield counter("fedge_broker_subscriptions_refused_total", {"": snap.get("broker_subscriptions_refused", 0)})
    yield counter("fedge_aggregator_cpu_seconds_total", snap.get("cpu_seconds", {}))
    for name in ("clients_online", "clients_known", "clients_selected", "clients_responded", "clients_benched",
                 "reassembly_bytes", "reassembly_limit_bytes", "inbox_messages"):
        yield gauge(f"fedge_{name}", snap[name])
    last = snap["last"]
    yield gauge("fedge_model_accuracy", last.get("accuracy"))
    yield gauge("fedge_model_loss", last.get("loss"))
    yield gauge("fedge_train_loss", last.get("train_loss"))
    privacy = snap.get("privacy")
    if privacy is not None:
        yield gauge("fedge_privacy_epsilon", privacy.get("epsilon", 0.0))
        yield gauge("fedge_privacy_epsilon_participant", privacy.get("epsilon_participant"))
        yield gauge("fedge_privacy_epsilon_budget", privacy["budget"])
        yield gauge("fedge_privacy_delta", privacy["delta"])
    yield from _buffered(f, snap.get("buffered"))
    checkpoint = snap["checkpoint_time"]
    if checkpoint is not None:
        yield gauge("fedge_checkpoint_timestamp_seconds", checkpoint)
        yield gauge("fedge_checkpoint_age_seconds", max(0.0, time.time() - checkpoint))


def _buffered(f: Families, buffered: dict[str, Any] | None) -> Iterator[Any]:
    """A buffered job's families (none for rounds)."""
    if buffered is None:
        return
    yield f.gauge("fedge_buffered_concurrency", buffered["concurrency"])
    yield f.gauge("fedge_buffered_training", buffered["training"])
    yield f.gauge("fedge_buffered_buffer_updates", buffered["buffer"])
    yield f.histogram("fedge_buffered_staleness", buffered["staleness"], STALENESS_BUCKETS)


class AggregatorMetrics(ServiceMetrics):
    """The registry, the histograms, and (``start``) the HTTP listener."""

    def __init__(self, settings: MetricsSettings) -> None:
        super().__init__(settings, METRICS, render, "aggregator")
        self.fold_seconds = self.histogram("fedge_update_fold_seconds", FAST_BUCKETS)
        self.close_seconds = self.histogram("fedge_round_close_seconds", FAST_BUCKETS)
        self.round_seconds = self.histogram("fedge_round_duration_seconds", SLOW_BUCKETS)
        self.eval_seconds = self.histogram("fedge_evaluation_seconds", SLOW_BUCKETS)


def service_snapshot(cfg: AggregatorConfig, core: RoundCore, last: RoundRecord | None,
                     traffic: Any, broker: tuple[bool, int, int, int], reassembly_bytes: int, inbox_messages: int,
                     checkpoint_time: float | None) -> dict[str, Any]:
    """The aggregator's state as plain data (copied on its loop's thread),
    for ``render``: ``broker`` is (connected, failed connection attempts,
    messages dropped while it was unreachable)."""
    import fedge

    op = core.open
    snap: dict[str, Any] = {
        "job": cfg.job.name, "model": cfg.job.model, "version": fedge.__version__,
        "round": op.round if op is not None else core.next_round - 1,
        "rounds_planned": cfg.job.rounds, "done": core.state == "done",
        "counters": dict(core.counters), "rejections": dict(core.rejections), "failures": dict(core.failures),
        "traffic": traffic, "broker_connected": broker[0], "broker_connect_failures": broker[1],
        "broker_messages_dropped": broker[2], "broker_subscriptions_refused": broker[3],
        "clients_online": len(core.roster.online), "clients_known": len(core.roster.known),
        "clients_selected": len(op.selected) if op is not None else 0,
        "clients_responded": len(op.accepted) if op is not None else 0,
        "clients_benched": core.roster.sitting_out(core.next_round),
        "reassembly_bytes": reassembly_bytes, "reassembly_limit_bytes": cfg.limits.reassembly_bytes,
        "inbox_messages": inbox_messages,
        "last": {} if last is None else {"accuracy": last.accuracy, "loss": last.loss,
                                         "train_loss": last.train_loss},
        "checkpoint_time": checkpoint_time,
    }
    buffered = getattr(core.mode, "figures", None)
    if buffered is not None:
        snap["buffered"] = buffered()
    if cfg.privacy.mode != "off":
        extra = {} if last is None else last.extra
        snap["privacy"] = {"epsilon": extra.get("epsilon", 0.0),
                           "epsilon_participant": extra.get("epsilon_participant"),
                           "budget": cfg.privacy.target_epsilon, "delta": cfg.privacy.delta}
    return snap
