"""The production broker setup as shipped in deploy/mosquitto: TLS, a password
per device, and the ACL that confines each device to its own topics."""

import dataclasses
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge import chunks, wire
from fedge.config import updated
from fedge.mqtt import MqttLink
from fedge.topics import JobTopics

from .support import broker_settings, devices, job_config, running_aggregator, running_fleet, wait_for

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
USERS = ["aggregator", "dev-0", "dev-1", "observer", "east", "west"]  # east, west: relays


def make_pki(d: Path) -> None:
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedge-test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "server.crt"))


@pytest.fixture
def secure_broker(mosquitto_factory, tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    passwd = tmp_path / "fedge.passwd"
    for i, user in enumerate(USERS):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(passwd), user, f"pw-{user}"],
                       check=True, capture_output=True)
        (tmp_path / f"{user}.pw").write_text(f"pw-{user}\n")
    # The shipped config, with only paths and the port adapted to the test.
    conf = (DEPLOY / "fedge.conf").read_text()
    conf = conf.replace("listener 8883\n", "")
    for name in ("ca.crt", "server.crt", "server.key"):
        conf = conf.replace(f"/etc/mosquitto/certs/{name}", str(pki / name))
    conf = conf.replace("/etc/mosquitto/fedge.passwd", str(passwd))
    conf = conf.replace("/etc/mosquitto/fedge.acl", str(DEPLOY / "fedge.acl"))
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("persistence"))
    broker = mosquitto_factory(extra=conf.replace("per_listener_settings false", "") + "\n", tls=True)
    # The fixture wrote "listener <port> 127.0.0.1" first; the TLS options follow it.
    return broker, pki, tmp_path


def settings_for(broker, pki, tmp, user):
    return broker_settings(broker.url, username=user, password_file=str(tmp / f"{user}.pw"),
                           password_env="FEDGE_TEST_UNSET", ca_file=str(pki / "ca.crt"))


def test_a_job_runs_over_tls_with_passwords_and_acls_and_devices_stay_in_their_lane(secure_broker):
    broker, pki, tmp = secure_broker
    cfg = job_config(tmp, broker.url, job="secure", rounds=3, agents=2)
    cfg = updated(cfg, broker=settings_for(broker, pki, tmp, "aggregator"))
    specs = devices(tmp, "secure", 2)
    specs = [dataclasses.replace(s, broker=settings_for(broker, pki, tmp, s.client_id)) for s in specs]
    topics = JobTopics("secure")
    with running_aggregator(cfg) as (service, records), running_fleet(specs, cfg.broker):
        wait_for(lambda: len(records) >= 1, 90, "round 1 over TLS")
        genuine_key, identity = service.core.models.key_message, service.identity
        # dev-0's credentials, in the wrong hands.
        got: list[str] = []
        impostor = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-0-impostor")
        impostor.username_pw_set("dev-0", "pw-dev-0")
        impostor.tls_set(ca_certs=str(pki / "ca.crt"))
        impostor.on_message = lambda c, u, m: got.append(m.topic)
        impostor.connect("127.0.0.1", broker.port)
        impostor.loop_start()
        impostor.subscribe(topics.ack("dev-1"), qos=1)
        impostor.subscribe(topics.update_filter, qos=1)
        impostor.subscribe(topics.device_filter, qos=1)  # the fleet's hardware and receipts: not for devices
        forged = chunks.split(b"forged update for dev-1", 1000)[0]
        impostor.publish(topics.update("dev-1"), forged, qos=1).wait_for_publish(5)
        impostor.publish(topics.key_chunk(0), chunks.split(b"evil model", 1000)[0], qos=1,
                         retain=True).wait_for_publish(5)
        impostor.publish(topics.delta_chunk(0), chunks.split(b"evil delta", 1000)[0], qos=1,
                         retain=True).wait_for_publish(5)
        impostor.publish(topics.round, b"evil round", qos=1, retain=True).wait_for_publish(5)
        assert service.done.wait(90), f"job did not finish: {records}"
        time.sleep(0.5)
        impostor.loop_stop()
        counters = dict(service.core.counters)
    assert [r["clients"] for r in records] == [2, 2, 2], records
    assert not any(k.startswith("chunk_") for k in counters), counters  # the forged chunk never arrived
    assert got == [], "a device read receipts or updates that are not its own"
    # The retained key model is still the aggregator's.
    seen: list[bytes] = []
    reader = paho.Client(CallbackAPIVersion.VERSION2)
    reader.username_pw_set("dev-1", "pw-dev-1")
    reader.tls_set(ca_certs=str(pki / "ca.crt"))
    reader.on_message = lambda c, u, m: seen.append(m.payload)
    reader.connect("127.0.0.1", broker.port)
    reader.subscribe(topics.key_chunk(0), qos=1)
    reader.loop_start()
    wait_for(lambda: seen, 10, "the retained model")
    reader.loop_stop()
    # (as published: signed by the aggregator; Ed25519 signatures are deterministic)
    assert chunks.parse_chunk(seen[0]).message_id == chunks.message_id(wire.seal(genuine_key, identity))
    # The observer (fedge status) reads the device records a device may not.
    records_seen: list[str] = []
    observer = paho.Client(CallbackAPIVersion.VERSION2)
    observer.username_pw_set("observer", "pw-observer")
    observer.tls_set(ca_certs=str(pki / "ca.crt"))
    observer.on_message = lambda c, u, m: records_seen.append(m.topic)
    observer.connect("127.0.0.1", broker.port)
    observer.subscribe(topics.device_filter, qos=1)
    observer.loop_start()
    wait_for(lambda: len(records_seen) >= 2, 10, "the retained device records")
    observer.loop_stop()
    assert sorted(records_seen) == [topics.device("dev-0"), topics.device("dev-1")]


def test_wrong_credentials_and_unknown_cas_are_refused(secure_broker):
    broker, pki, tmp = secure_broker
    events = []
    bad_pw = dataclasses.replace(settings_for(broker, pki, tmp, "dev-0"), password_file=str(tmp / "dev-1.pw"))
    link = MqttLink(bad_pw, "dev-0", events.append, persistent=False)
    link.start()
    assert not link.wait_connected(3)
    link.stop()
    # Each says why, for the outage line and `fedge status`.
    assert link.connect_failures >= 1 and "refused the connection (Not authorized)" in link.last_error
    no_ca = dataclasses.replace(settings_for(broker, pki, tmp, "dev-0"), ca_file="")
    link = MqttLink(no_ca, "dev-0", events.append, persistent=False)
    link.start()
    assert not link.wait_connected(3)
    link.stop()
    assert link.connect_failures >= 1 and "TLS certificate is not trusted" in link.last_error
    ok = MqttLink(settings_for(broker, pki, tmp, "dev-0"), "dev-0", events.append, persistent=False)
    ok.start()
    assert ok.wait_connected(5)
    ok.stop()


def test_the_shipped_acl_confines_each_relay_to_its_region_and_each_device_to_its_own_topics(secure_broker):
    broker, pki, _ = secure_broker
    east, west = JobTopics("j", "east"), JobTopics("j", "west")

    def client(user: str, subscribe: list[str]) -> tuple[paho.Client, list[tuple[str, bytes]]]:
        got: list[tuple[str, bytes]] = []
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}")
        c.username_pw_set(user, f"pw-{user}")
        c.tls_set(ca_certs=str(pki / "ca.crt"))
        c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
        c.connect("127.0.0.1", broker.port)
        for topic in subscribe:
            c.subscribe(topic, qos=1)
        c.loop_start()
        return c, got

    relay_east, heard_east = client("east", [east.update_filter, east.round])
    relay_west, heard_west = client("west", [west.round])
    device, _ = client("dev-0", [])
    time.sleep(0.5)  # the subscriptions are in
    for c, topic, payload in (
        (relay_east, east.round, b"east's announcement"),  # its own region: allowed
        (relay_east, west.round, b"east in west"),  # another region: refused
        (device, east.round, b"a device's announcement"),  # a device announces nothing
        (device, east.update("dev-0"), b"dev-0's update"),  # its own update, to its region: allowed
        (device, east.update("dev-1"), b"dev-0 as dev-1"),  # another device's: refused
    ):
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    wait_for(lambda: (east.update("dev-0"), b"dev-0's update") in heard_east, 10, "the device's update")
    time.sleep(0.5)
    for c in (relay_east, relay_west, device):
        c.loop_stop()
    assert sorted(heard_east) == [(east.round, b"east's announcement"), (east.update("dev-0"), b"dev-0's update")]
    assert heard_west == []
