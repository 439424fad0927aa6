"""What a closed round's record becomes, in the aggregator's shell.

The round core hands the shell a ``RoundFinished``: the record of what the
round did and the model it made. ``RoundReporter`` evaluates that model
(every ``evaluate.every`` rounds and at the last), adds the shell's own
counts (dropped chunks, the time, the CPU each stage took since the
previous record), appends the record to ``rounds.jsonl``, publishes it on
the events topic for observers (``fedge watch``), logs the round in one
line and hands the record to the embedding program's ``on_record`` hook.
Whatever fails on the way is counted and logged; the round stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedge import messages
from fedge.logs import fields
from fedge.records import RoundRecord

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.cpu import StageClock
    from aggregator.evaluation import Evaluator
    from aggregator.events import RoundFinished
    from aggregator.keys import AggregatorKeys
    from aggregator.metrics import AggregatorMetrics
    from aggregator.state import StateDir
    from fedge.topics import JobTopics

log = logging.getLogger("fedge.aggregator")

RecordHook = Callable[[RoundRecord], None]


class RoundReporter:
    def __init__(self, cfg: AggregatorConfig, evaluator: Evaluator, state: StateDir, link: Any, topics: JobTopics,
                 keys: AggregatorKeys, cpu: StageClock, metrics: AggregatorMetrics | None,
                 on_record: RecordHook | None, incident: Callable[[str], None],
                 contained: Callable[[Exception, object], None], recorded: Callable[[RoundRecord], None]) -> None:
        """``incident(reason)`` counts a failure; ``contained(exc, item)``
        counts and logs one no input may cause; ``recorded(record)`` runs
        once the record is complete, before it is written anywhere (the
        shell's metrics snapshot)."""
        self.cfg = cfg
        self.evaluator = evaluator
        self.state = state
        self.link = link
        self.topics = topics
        self.keys = keys
        self.cpu = cpu
        self.metrics = metrics
        self.on_record = on_record
        self.incident = incident
        self.contained = contained
        self.recorded = recorded

    def report(self, fin: RoundFinished, handle_started: float, dropped_chunks: int) -> RoundRecord:
        """The round's complete record, written, published, logged and
        handed on. ``handle_started``: ``perf_counter`` when the core began
        the event that closed the round (for the close's duration)."""
        record = fin.record
        if self.metrics is not None:  # the close: its checkpoint and model are out; evaluation is not counted
            self.metrics.close_seconds.observe(time.perf_counter() - handle_started)
            self.metrics.round_seconds.observe(record.seconds)
        ev = self.cfg.evaluate
        if ev.data and (fin.last or record.round % max(1, ev.every) == 0):
            record = self._evaluated(record, fin)
        record = record.replace(dropped_chunks=dropped_chunks, time=round(time.time(), 3), cpu_seconds=self.cpu.take())
        if self.metrics is not None and record.eval_seconds is not None:
            self.metrics.eval_seconds.observe(record.eval_seconds)
        self.recorded(record)
        with self.cpu.stage("save"):
            self.state.append_round(record.to_json())
        try:  # observers' copy: whatever goes wrong with it, the round's log line and hooks follow
            event = messages.encode_event(self.cfg.job.name, record.to_json())
            with self.cpu.stage("publish"):
                self.link.publish(self.topics.events, self.keys.seal(event))
        except Exception as exc:
            self.contained(exc, fin)
        log.info("round %d %s: %d/%d clients%s", record.round, record.status, record.clients, record.selected,
                 "" if record.accuracy is None else f", accuracy {record.accuracy:.4f}",
                 extra=fields(round=record.round, status=record.status, reason=record.failure))
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:  # an embedding program's bug must not stop the job
                self.incident("on_record_failed")
                log.exception("the on_record callback failed for round %d", record.round)
        return record

    def _evaluated(self, record: RoundRecord, fin: RoundFinished) -> RoundRecord:
        started = time.perf_counter()
        try:
            with self.cpu.stage("evaluate"):
                metrics = self.evaluator.evaluate(fin.model)
        except Exception:  # the evaluation data or model code: the round itself stands
            self.incident("eval_failed")
            log.exception("evaluating the model of round %d failed; recorded without accuracy", record.round,
                          extra=fields(round=record.round, reason="eval_failed"))
            metrics = {}
        return record.replace(accuracy=metrics.get("accuracy"), loss=metrics.get("loss"),
                              eval_seconds=round(time.perf_counter() - started, 4))

