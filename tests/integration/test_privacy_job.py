"""A differentially private job over a real Mosquitto with real agents:
noise shared by the devices, adaptive clipping, epsilon in every record, and
an aggregator restarted in the middle that ends on the epsilon an
uninterrupted job would have."""

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.privacy import PrivacySpec, epsilon
from fedge.config import updated

from .support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration

PRIVACY = {"mode": "distributed", "clip": 0.5, "noise_multiplier": 1.0, "sampling_rate": 1.0, "delta": 1e-3,
           "clip_quantile": 0.5, "clip_bit_noise": 1.0}


def test_a_private_job_with_distributed_noise_survives_an_aggregator_restart(mosquitto, tmp_path):
    cfg = updated(job_config(tmp_path, mosquitto.url, rounds=5, agents=4), privacy=PRIVACY,
                  codec={"name": "none"},  # distributed noise travels in float32
                  metrics={"enabled": True, "port": 0})
    fleet_specs = devices(tmp_path, "itest", 4)
    with running_fleet(fleet_specs, cfg.broker) as fleet:
        with running_aggregator(cfg) as (service, first):
            wait_for(lambda: len(first) >= 2, 90, "two private rounds")
        with running_aggregator(cfg) as (service, second):
            assert service.done.wait(120), f"job did not finish after the restart: {second}"
        scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(generate_latest(service.metrics.registry).decode())
                   for s in f.samples}
        counters = [dict(d.core.counters) for d in fleet.devices.values()]
    records = {r["round"]: r for r in first + second}  # a round redone after the restart replaces its first try
    assert sorted(records) == [1, 2, 3, 4, 5]
    spec = PrivacySpec(1.0, 1.0, 1e-3)
    for r in records.values():
        assert r["status"] == "ok" and r["dp_noise"] == "distributed"
        assert r["dp_noise_shares"] == r["clients"] and not r.get("left_out")  # each update carried its share
        assert r["epsilon"] == pytest.approx(epsilon(spec, r["dp_rounds"]), abs=1e-3)
        assert r["epsilon_aggregator"] > r["epsilon_participant"]  # no secure aggregation yet
    assert records[5]["dp_rounds"] == 5  # counted once each, across the restart
    assert records[5]["epsilon"] == pytest.approx(epsilon(spec, 5), abs=1e-3)
    assert records[2]["dp_clip"] != 0.5  # the clip moved
    assert sum(c.get("dp_clipped", 0) + c.get("dp_within_clip", 0) for c in counters) >= 5 * 4 - 4
    # The restarted aggregator's metrics: the epsilon it spent, and the rounds counted across the restart.
    assert scraped[("fedge_privacy_epsilon", ())] == records[5]["epsilon"]
    assert scraped[("fedge_privacy_epsilon_participant", ())] == records[5]["epsilon_participant"]
    assert scraped[("fedge_privacy_delta", ())] == 1e-3
    assert scraped[("fedge_rounds_total", (("outcome", "ok"),))] == 5
