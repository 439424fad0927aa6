"""Compressed rounds over a real Mosquitto: top-k updates with error feedback
converge, and the downlink's key models and deltas bring back a device that
missed several rounds (and key changes) and one that joins late."""

import pytest

from fedge.config import updated

from .support import devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration
TOPK = {"fraction": 0.1, "values": "int8"}


def compressed_job(tmp_path, url, rounds, agents, key_every):
    cfg = job_config(tmp_path, url, job="downlink", rounds=rounds, agents=agents)
    return updated(cfg, codec={"name": "topk", "params": dict(TOPK)},
                   downlink={"codec": {"name": "int8", "block": 64}, "key_every": key_every})


def test_topk_with_error_feedback_converges_on_digits(mosquitto, tmp_path):
    cfg = compressed_job(tmp_path, mosquitto.url, rounds=20, agents=3, key_every=5)
    with running_aggregator(cfg) as (service, records), running_fleet(devices(tmp_path, "downlink", 3),
                                                                      cfg.broker) as fleet:
        assert service.done.wait(180), records
        residuals = [dev.core.residual for dev in fleet.devices.values()]
    assert all(r["status"] == "ok" and r["clients"] == 3 for r in records)
    assert records[-1]["accuracy"] >= 0.85, [r["accuracy"] for r in records]
    assert all(res is not None for res in residuals), "error feedback keeps a residual on every device"
    assert all((tmp_path / "agents" / f"dev-{i}" / "residual.safetensors").exists() for i in range(3))


def test_devices_that_miss_rounds_or_join_late_resynchronise_from_key_and_delta(mosquitto, tmp_path):
    cfg = compressed_job(tmp_path, mosquitto.url, rounds=12, agents=2, key_every=3)
    # Long enough for a loaded machine's first training (a cold worker); a
    # device that leaves says so (its offline), and is not waited for.
    cfg = updated(cfg, selection={"deadline_s": 60.0})
    specs = devices(tmp_path, "downlink", 4)
    regulars, wanderer, latecomer = specs[:2], specs[2], specs[3]
    with running_aggregator(cfg) as (service, records), running_fleet(regulars, cfg.broker) as fleet:
        pool = fleet.pool  # later devices share warm workers: they train at once
        with running_fleet([wanderer], cfg.broker, pool=pool) as first_life:
            wait_for(lambda: any("dev-2" in r["accepted"] for r in records), 180, "dev-2 to take part")
            early_key = first_life.devices["dev-2"].core.key.model.round
        # dev-2 is gone while keys change (rounds 3, 6 and 9); dev-3 appears midway.
        wait_for(lambda: len(records) >= 4, 180, "round 4")
        with running_fleet([latecomer], cfg.broker, pool=pool) as late:
            wait_for(lambda: len(records) >= 6, 180, "round 6")
            with running_fleet([wanderer], cfg.broker, pool=pool) as second_life:
                assert service.done.wait(300), records
                back = second_life.devices["dev-2"].core
                newcomer = late.devices["dev-3"].core
        regulars_cores = [d.core for d in fleet.devices.values()]
    returned = [r for r in records if r["round"] > 6 and "dev-2" in r["accepted"]]
    joined = [r for r in records if "dev-3" in r["accepted"]]
    assert returned, "the device that missed rounds trained again after coming back"
    assert joined, "the late joiner trained"
    assert back.key.model.round > early_key, "it took the newer key"
    for core in [back, newcomer, *regulars_cores]:
        assert core.counters.get("corrupt_delta", 0) == 0 and core.counters.get("bad_delta", 0) == 0
    assert all(r["status"] == "ok" for r in records)
    assert [r["round"] for r in records] == list(range(1, 13))
