"""``fedge report --follow``: the report drawn from the events topic of a
live job over a real Mosquitto, rewritten after each round until the last."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from aggregator.config import AggregatorConfig
from fedge import messages
from fedge.config import render_defaults
from fedge.topics import JobTopics
from tests.conftest import fedge_cmd

from .support import devices, job_config, running_aggregator, running_fleet

pytestmark = pytest.mark.integration


def test_follow_draws_the_rounds_as_they_close_and_stops_at_the_last(mosquitto, tmp_path, cli_env):
    cfg = job_config(tmp_path, mosquitto.url, rounds=3, agents=2)
    conf = tmp_path / "job.toml"
    conf.write_text(render_defaults(AggregatorConfig, cfg))
    fleet = devices(tmp_path, "itest", 2)  # enrolls them, and makes the aggregator's key the report checks
    report = subprocess.Popen(fedge_cmd("report", "--follow", "--config", str(conf), "--out",
                                        str(tmp_path / "live"), "--json"),
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # subscribed before the first round closes (events are not retained)
        # A forged "last round", unsigned: believed, it would end the report at once.
        forged = {"round": 3, "attempt": 1, "status": "ok", "closed_by": "quorum", "selected": 2, "clients": 2,
                  "declined": 0, "late": 0, "rejected": {}, "num_samples": 1, "train_loss": 0.0, "bytes_up": 1,
                  "bytes_down": 1, "seconds": 1.0, "model_digest": "0" * 64, "accuracy": 1.0}
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-t", JobTopics("itest").events, "-s"],
                       input=messages.encode_event("itest", forged), check=True, timeout=10)
        with running_aggregator(cfg) as (service, records), running_fleet(fleet, cfg.broker):
            assert service.done.wait(90), f"job did not finish: {records}"
        out, err = report.communicate(timeout=60)
    finally:
        report.kill()
    assert report.returncode == 0, err
    summary = json.loads(out)
    assert summary["job"] == "itest" and summary["rounds"] == 3 and summary["last_round"] == 3
    assert summary["final_accuracy"] == records[-1]["accuracy"] != 1.0
    assert "ignored an event" in err and "not signed" in err
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("round ")] == \
        ["round 1", "round 2", "round 3"]  # rewritten after each
    assert (tmp_path / "live.png").stat().st_size > 10_000 and "data:image/png" in (tmp_path / "live.html").read_text()


def test_watch_prints_the_rounds_and_exits_at_the_jobs_end(mosquitto, tmp_path, cli_env):
    """fedge watch used to run forever after the last round (issue 26, item 4):
    the job's end is its announcement's state, and watch ends with it, after
    the last round's row; started after the end, it says so and exits."""
    cfg = job_config(tmp_path, mosquitto.url, rounds=2, agents=2)
    conf = tmp_path / "job.toml"
    conf.write_text(render_defaults(AggregatorConfig, cfg))
    fleet = devices(tmp_path, "itest", 2)
    watch = subprocess.Popen(fedge_cmd("watch", "--config", str(conf)), env=cli_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # subscribed before the first round closes (events are not retained)
        with running_aggregator(cfg) as (service, records), running_fleet(fleet, cfg.broker):
            assert service.done.wait(90), f"job did not finish: {records}"
            out, err = watch.communicate(timeout=30)  # while the aggregator still runs
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    rows = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert rows[-2:] == ["1", "2"], out
    again = subprocess.run(fedge_cmd("watch", "--config", str(conf)), env=cli_env, capture_output=True, text=True,
                           timeout=30)
    assert again.returncode == 0 and "is done after round 2" in again.stderr, again.stderr
