"""A whole job over a real Mosquitto: several rounds, several agents, both
MQTT versions, a broker packet limit far below the model size, and a broker
that restarts in the middle of the job."""

import pytest

from .support import devices, job_config, read_log, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_job_runs_to_completion(mosquitto_factory, tmp_path, protocol):
    # The broker refuses packets over 12 KB, smaller than the ~20 KB global
    # model: everything must arrive in chunks.
    broker = mosquitto_factory(extra="max_packet_size 12000\n")
    cfg = job_config(tmp_path, broker.url, rounds=4, agents=3, protocol=protocol, max_packet_bytes=8192)
    with running_aggregator(cfg) as (service, records), running_fleet(devices(tmp_path, "itest", 3), cfg.broker):
        assert service.done.wait(90), f"job did not finish; records so far: {records}"
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(r["status"] == "ok" and r["clients"] == 3 for r in records)
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    assert records[-1]["accuracy"] > 0.6
    assert [r["round"] for r in read_log(tmp_path / "aggregator")] == [1, 2, 3, 4]
    assert len(service.core.models.key_message) > 12000  # really was chunked


def test_job_survives_a_broker_restart(mosquitto, tmp_path):
    cfg = job_config(tmp_path, mosquitto.url, rounds=6, agents=3)
    with running_aggregator(cfg) as (service, records), running_fleet(devices(tmp_path, "itest", 3), cfg.broker):
        wait_for(lambda: len(records) >= 2, 60, "two rounds")
        mosquitto.restart()  # persistence keeps retained models and queued messages
        assert service.done.wait(120), f"job did not finish after the broker restart: {records}"
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["clients"] >= 1 for r in records)
    # Clients counted at most once per round, whatever was resent.
    assert all(len(set(r["accepted"])) == len(r["accepted"]) == r["clients"] for r in records)


def test_a_job_whose_rounds_invite_their_devices(mosquitto_factory, tmp_path):
    # selection.list_max = 1: every round selects more devices than its
    # announcement lists, so each device learns it is selected from the
    # invitation on its receipt topic (what a round of thousands does), and
    # a broker restarted without persistence in the middle (sessions,
    # retained messages and any invite in flight gone) does not stop the job.
    from fedge.config import updated

    broker = mosquitto_factory(persistence=False)
    cfg = updated(job_config(tmp_path, broker.url, rounds=5, agents=3), selection={"list_max": 1})
    with running_aggregator(cfg) as (service, records), running_fleet(devices(tmp_path, "itest", 3), cfg.broker):
        wait_for(lambda: len(records) >= 2, 60, "two rounds")
        broker.restart()
        assert service.done.wait(120), f"job did not finish; records so far: {records}"
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["status"] == "ok" for r in records)
    assert sum(r["clients"] for r in records) >= 12  # nearly every invited device answered, all after the restart
    assert records[-1]["clients"] == 3
