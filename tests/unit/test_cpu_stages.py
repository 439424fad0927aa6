"""Where the aggregator's CPU goes (``aggregator.cpu.StageClock``): each
stage is charged what ran inside it and not inside a stage nested in it."""

from __future__ import annotations

import time

import pytest

from aggregator.cpu import STAGES, StageClock, staged
from fedge.records import RecordError, RoundRecord


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_nested_stages_are_charged_once_each():
    clock = StageClock()
    clock.take()
    with clock.stage("receive"):
        burn(0.02)
        with clock.stage("update"):
            burn(0.05)
        burn(0.02)
    burn(0.01)
    got = clock.take()
    assert 0.05 <= got["update"] < 0.07
    assert 0.04 <= got["receive"] < 0.06
    assert 0.01 <= got["other"] < 0.03
    assert set(got) <= {*STAGES, "mqtt", "other_threads"}
    again = clock.take()  # counted from the last take
    assert again.get("update", 0.0) == 0.0
    assert clock.totals["update"] == pytest.approx(got["update"], abs=1e-3)


def test_a_method_marked_with_its_stage_charges_it_even_when_it_raises():
    class Service:
        def __init__(self) -> None:
            self.cpu = StageClock()

        @staged("save")
        def save(self) -> None:
            burn(0.02)
            raise OSError("disk full")

    s = Service()
    s.cpu.take()
    with pytest.raises(OSError):
        s.save()
    burn(0.01)
    got = s.cpu.take()
    assert got["save"] >= 0.02 and got["other"] >= 0.01  # left the stage on the way out


def test_current_totals_grow_without_resetting():
    clock = StageClock()
    with clock.stage("verify"):
        burn(0.02)
    first = clock.current()["verify"]
    assert first >= 0.02
    assert clock.take()["verify"] >= first


def test_a_record_carries_its_cpu_and_refuses_a_bad_one():
    rec = RoundRecord(round=1, attempt=1, status="ok", closed_by="quorum", selected=2, clients=2, declined=0, late=0,
                      rejected={}, num_samples=10, train_loss=0.5, bytes_up=1, bytes_down=1, seconds=1.0,
                      model_digest="d", cpu_seconds={"update": 0.25, "mqtt": 0.1})
    data = rec.to_json()
    assert data["cpu_seconds"] == {"update": 0.25, "mqtt": 0.1}
    assert RoundRecord.from_json(data) == rec
    assert "cpu_seconds" not in rec.replace(cpu_seconds={}).to_json()
    for bad in ({"update": -1.0}, {"update": "fast"}, {"update": float("nan")}, ["update"],
                {f"s{i}": 0.0 for i in range(65)}):
        with pytest.raises(RecordError):
            RoundRecord.from_json({**data, "cpu_seconds": bad})


def test_another_threads_cpu_is_read_from_the_kernel_and_is_zero_once_it_ended():
    import threading

    from aggregator.cpu import _thread_cpu

    ids: list[int | None] = []
    burned, release = threading.Event(), threading.Event()

    def work() -> None:
        ids.append(threading.get_native_id())
        burn(0.05)
        burned.set()
        release.wait(30)

    t = threading.Thread(target=work)
    t.start()
    assert burned.wait(30)
    assert _thread_cpu(ids[0]) >= 0.03  # in clock ticks: 0.01 s
    release.set()
    t.join()
    assert _thread_cpu(ids[0]) == 0.0 and _thread_cpu(None) == 0.0
