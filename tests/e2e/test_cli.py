"""The `fedge` command as a user runs it."""

import json
import subprocess
import sys

import pytest

from fedge.identity import Identity
from tests.conftest import fedge_cmd

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.e2e
KEY = Identity.generate().public.to_text()  # an aggregator key for agents to pin (nothing connects)


def run(cli_env, *args, timeout=300):
    return subprocess.run(fedge_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=timeout)


def test_demo_runs_end_to_end_with_the_embedded_broker(tmp_path, cli_env):
    out = tmp_path / "demo.json"
    proc = run(cli_env, "demo", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "round  clients  accuracy" in proc.stdout and "done:" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 30
    for r in result["rounds"]:
        assert set(r) >= {"round", "accuracy", "loss", "clients", "bytes_up", "bytes_down", "seconds"}
        assert r["clients"] == 10 and r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert [r["round"] for r in result["rounds"]] == list(range(1, 31))
    assert result["final_accuracy"] >= 0.90
    assert "Traceback" not in proc.stderr
    assert "\r" not in proc.stdout + proc.stderr, "progress lines are for terminals, not pipes"


def test_demo_against_an_external_broker_over_mqtt5(mosquitto, tmp_path, cli_env):
    out = tmp_path / "d.json"
    proc = run(cli_env, "demo", "--broker", mosquitto.url, "--protocol", "5", "--agents", "3", "--rounds", "3",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "(embedded)" not in proc.stdout
    assert len(json.loads(out.read_text())["rounds"]) == 3


def test_a_relayed_demo_folds_every_agent_through_its_regions_relay(mosquitto, tmp_path, cli_env):
    out = tmp_path / "d.json"
    proc = run(cli_env, "demo", "--broker", mosquitto.url, "--agents", "5", "--relays", "2", "--rounds", "3",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "relays: 2 regions" in proc.stdout
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["clients"], r["relays"], r["status"]) for r in rounds] == [(5, 2, "ok")] * 3
    # What a relayed job cannot run yet, or a relay count that makes no regions: one line and exit 2.
    for bad in (["--relays", "2", "--mode", "buffered"], ["--relays", "2", "--secure-aggregation"],
                ["--relays", "6", "--agents", "5"]):
        proc = run(cli_env, "demo", *bad)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)


def test_demo_stops_quietly_when_its_reader_goes_away(cli_env):
    # `fedge demo | head -3`: the demo must end, not hang or print a traceback.
    proc = subprocess.Popen(fedge_cmd("demo", "--agents", "3", "--rounds", "200"), env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(3):
        proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err, err


def test_demo_on_the_tabular_data_set(tmp_path, cli_env):
    out = tmp_path / "bc.json"
    proc = run(cli_env, "demo", "--data", "breast-cancer", "--agents", "4", "--rounds", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 5 and result["final_accuracy"] >= 0.9


def test_a_private_demo_stops_at_its_budget_and_reports_epsilon(tmp_path, cli_env):
    from aggregator.privacy import PrivacySpec, epsilon, rounds_within
    from fedge_cli.demo import DEMO_PRIVACY

    out = tmp_path / "dp.json"
    proc = run(cli_env, "demo", "--agents", "4", "--rounds", "30", "--target-epsilon", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    spec = PrivacySpec(DEMO_PRIVACY["noise_multiplier"], DEMO_PRIVACY["sampling_rate"], DEMO_PRIVACY["delta"])
    allowed = rounds_within(spec, 3.0)
    header = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("round  clients"))
    assert f"allows {allowed} round" in proc.stdout and header.endswith("epsilon")
    assert "privacy budget" in proc.stderr and "Traceback" not in proc.stderr
    rounds = json.loads(out.read_text())["rounds"]
    assert len(rounds) == allowed  # the budget, not --rounds, ended it
    assert [r["epsilon"] for r in rounds] == [round(epsilon(spec, i + 1), 4) for i in range(allowed)]
    assert all(r["delta"] == 1e-3 and r["sampling_rate"] == 0.5 and r["noise_multiplier"] == 1.5 for r in rounds)


def test_a_buffered_demo_on_a_simulated_fleet_and_its_report(tmp_path, cli_env):
    """`fedge demo --mode buffered`: versions, not rounds, on a home Wi-Fi
    fleet profile; the report draws their staleness."""
    state = tmp_path / "state"
    out = tmp_path / "b.json"
    proc = run(cli_env, "demo", "--mode", "buffered", "--rounds", "12", "--state-dir", str(state), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "version  updates" in proc.stdout and "staleness mean/max" in proc.stdout
    assert "fleet profile home-wifi" in proc.stdout and "done: 12 versions" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["round"] for r in result["rounds"]] == list(range(1, 13))
    assert all(r["clients"] == 2 and r["status"] == "ok" for r in result["rounds"])  # 10 agents: a version of 2
    assert result["agents_bytes_sent"] > 0 and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (state / "aggregator" / "rounds.jsonl").read_text().splitlines()]
    assert all(r["buffered"]["version"] == r["round"] and sum(r["buffered"]["staleness"].values()) == 2
               for r in records)
    proc = run(cli_env, "report", "--state-dir", str(state), "--out", str(tmp_path / "r" / "job"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["mode"] == "buffered" and sum(summary["staleness"].values()) == 24
    assert (tmp_path / "r" / "job.png").stat().st_size > 0
    assert "buffered asynchronous aggregation" in (tmp_path / "r" / "job.html").read_text()
    # What a buffered job cannot run yet is one line and exit 2.
    _one_line_error(run(cli_env, "demo", "--mode", "buffered", "--secure-aggregation"), "--mode synchronous")


def test_report_draws_a_real_private_job_as_png_and_self_contained_html(tmp_path, cli_env):
    import base64
    import re

    from matplotlib import image

    state = tmp_path / "state"
    shown = run(cli_env, "demo", "--agents", "4", "--rounds", "3", "--target-epsilon", "8", "--state-dir", str(state),
                "--json", str(tmp_path / "demo.json"))
    assert shown.returncode == 0, shown.stderr
    records = [json.loads(line) for line in (state / "aggregator" / "rounds.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # The demo's own --state-dir is enough: the report finds its aggregator's state in it.
    proc = run(cli_env, "report", "--state-dir", str(state), "--out", str(tmp_path / "r" / "job"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["job"] == "demo-digits" and summary["rounds"] == 3
    assert summary["final_accuracy"] == records[-1]["accuracy"]
    assert summary["epsilon"] == records[-1]["epsilon"]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in records)
    # Same name, same count: the demo's bytes_up/bytes_down are the aggregator's, as the report's are; what
    # the agents measured has names of its own, and the table says which it shows.
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert (demo["bytes_up"], demo["bytes_down"]) == (summary["bytes_up"], summary["bytes_down"])
    assert [r["bytes_down"] for r in demo["rounds"]] == [r["bytes_down"] for r in records]
    assert demo["agents_bytes_received"] == sum(r["agents_bytes_received"] for r in demo["rounds"]) > 0
    assert "sent KiB  recv KiB" in shown.stdout and "MQTT payloads all agents sent / received" in shown.stdout
    assert f"received {demo['agents_bytes_received'] / 2**20:.2f} MiB" in shown.stdout
    png = (tmp_path / "r" / "job.png").read_bytes()
    height, width, _ = image.imread(tmp_path / "r" / "job.png").shape
    assert width > 1000 and height > 1000  # four rows of panels: privacy is drawn
    page = (tmp_path / "r" / "job.html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == png
    assert not re.search(r'(src|href)="(http|//)', page), "the page fetches nothing"
    for r in records:
        assert f"<td>{r['accuracy']:.4f}</td>" in page and f"<td>{r['epsilon']:.3f}</td>" in page
    assert page.count("<tr>") == 3 + 1 + 8  # the rounds, the header row, eight summary rows (epsilon included)

    # A torn line is skipped and said; nothing to draw, or nowhere to look, is one line and exit 2.
    log = state / "aggregator" / "rounds.jsonl"
    log.write_text(log.read_text() + '{"round": 4, "status"')
    proc = run(cli_env, "report", "--state-dir", str(state / "aggregator"), "--out", str(tmp_path / "again"))
    assert proc.returncode == 0 and "skipped 1 line(s)" in proc.stderr and "3 rounds" in proc.stdout
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "rounds.jsonl").write_text("not json\n")
    _one_line_error(run(cli_env, "report", "--state-dir", str(tmp_path / "empty")), "holds no round record")
    _one_line_error(run(cli_env, "report", "--state-dir", str(tmp_path / "nowhere")), "does not exist")
    _one_line_error(run(cli_env, "report", "--follow"), "--follow reads the job's events topic")


def test_json_logs_are_one_object_per_line_from_every_process(cli_env):
    proc = run(cli_env, "--log-format", "json", "--log-level", "INFO", "demo", "--agents", "3", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]  # every line is JSON
    closed = [e for e in lines if e.get("status") == "ok" and e["message"].startswith(f"round {e.get('round')} ok")]
    assert [e["round"] for e in closed] == [1, 2]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)


def test_privacy_plans_the_noise_for_a_budget_and_accounts_a_jobs_config(tmp_path, cli_env):
    from aggregator.privacy import PrivacySpec, epsilon

    proc = run(cli_env, "privacy", "--target-epsilon", "3", "--rounds", "200", "--sampling-rate", "0.1",
               "--delta", "1e-5", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    spec = PrivacySpec(plan["noise_multiplier"], 0.1, 1e-5)
    assert epsilon(spec, 200) <= 3.0 < epsilon(PrivacySpec(plan["noise_multiplier"] * 0.99, 0.1, 1e-5), 200)
    assert plan["rounds_within_target"] == 200
    job = tmp_path / "job.toml"
    job.write_text('[job]\nrounds = 40\n[privacy]\nmode = "central"\nnoise_multiplier = 1.0\n'
                   'sampling_rate = 0.1\ntarget_epsilon = 2.0\nmin_devices = 10\n')
    proc = run(cli_env, "privacy", "--config", str(job))
    assert proc.returncode == 0, proc.stderr
    assert f"after     40 rounds: epsilon {epsilon(PrivacySpec(1.0, 0.1, 1e-5), 40):.3f}" in proc.stdout
    assert "allows" in proc.stdout
    # The flags beside --config are honoured, as the job's keys they name.
    proc = run(cli_env, "privacy", "--config", str(job), "--accountant", "pld", "--rounds", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    pld = json.loads(proc.stdout)
    assert pld["accountant"] == "pld" and pld["rounds"] == 20
    assert pld["epsilon"]["20"] == round(epsilon(PrivacySpec(1.0, 0.1, 1e-5, "pld"), 20), 4)
    _one_line_error(run(cli_env, "privacy", "--config", str(job), "--accountant", "exact"), "--accountant 'exact'")
    for bad in (["privacy", "--rounds", "5"], ["privacy", "--target-epsilon", "1", "--rounds", "5",
                                              "--sampling-rate", "2"],
                ["privacy", "--config", str(tmp_path / "missing.toml")]):
        proc = run(cli_env, *bad)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)


@pytest.mark.parametrize("role", ["aggregator", "agent"])
def test_config_prints_a_complete_documented_file(cli_env, role):
    proc = run(cli_env, "config", role)
    assert proc.returncode == 0
    data = tomllib.loads(proc.stdout)
    assert "broker" in data and data["broker"]["max_packet_bytes"] == 262144


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_a_secure_demo_with_dropouts_trains_on_the_sums_it_unmasks(tmp_path, cli_env):
    out = tmp_path / "sa.json"
    proc = run(cli_env, "demo", "--agents", "6", "--rounds", "4", "--secure-aggregation", "--dropout", "0.3",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "secure aggregation: each agent masks its update with 5 neighbours" in proc.stdout
    assert "dropout: each selected agent goes silent" in proc.stdout and "Traceback" not in proc.stderr
    rounds = json.loads(out.read_text())["rounds"]
    assert len(rounds) == 4
    for r in rounds:  # a round either unmasked the sum of what reached it, or failed and revealed nothing
        sec = r["secagg"]
        assert (r["status"], sec["stage"]) in (("ok", "done"), ("failed", "failed")), r
        assert sec["keys"] >= sec["shared"] >= sec["inputs"]
        assert r["status"] == "failed" or r["clients"] == sec["inputs"]
    # With P = 0.3 at least one agent (seeded per agent and round) drops out in these four rounds.
    assert any(r["clients"] < 6 for r in rounds), rounds
    assert any(r["status"] == "ok" for r in rounds)


def test_user_mistakes_get_one_clear_line_and_exit_2(tmp_path, cli_env, monkeypatch):
    # In tmp_path: a config that names no state_dir means ./fedge-aggregator-state, which the
    # aggregator's start-up check makes before a later check refuses the config.
    monkeypatch.chdir(tmp_path)
    _one_line_error(run(cli_env, "aggregator", "--config", str(tmp_path / "missing.toml")), "does not exist")
    typo = tmp_path / "typo.toml"
    typo.write_text("[agent]\nidd = 'x'\n")
    _one_line_error(run(cli_env, "agent", "--config", str(typo)), "agent.idd", "did you mean 'agent.id'")
    bad_model = tmp_path / "model.toml"
    bad_model.write_text("[job]\nmodel = 'nosuch.pkg:net'\n")
    _one_line_error(run(cli_env, "aggregator", "--config", str(bad_model)), "module 'nosuch' not found")
    not_module = tmp_path / "notmodule.toml"
    not_module.write_text("[job]\nmodel = 'fedge.datasets:digits'\n")
    _one_line_error(run(cli_env, "aggregator", "--config", str(not_module)), "not a torch.nn.Module")
    bad_name = tmp_path / "name.toml"
    bad_name.write_text("[job]\nname = 'my/job'\n")
    _one_line_error(run(cli_env, "aggregator", "--config", str(bad_name)), "job.name")
    bad_codec = tmp_path / "codec.toml"
    bad_codec.write_text("[codec]\nname = 'zip'\n")
    _one_line_error(run(cli_env, "aggregator", "--config", str(bad_codec)), "codec.name 'zip'")
    bad_url = tmp_path / "url.toml"
    bad_url.write_text("[broker]\nurl = 'http://x'\n")
    _one_line_error(run(cli_env, "agent", "--config", str(bad_url)), "broker.url")
    _one_line_error(run(cli_env, "demo", "--codec", "int9"), "unknown codec 'int9'")
    _one_line_error(run(cli_env, "demo", "--codec", '{"name": int8}'), "not valid JSON")
    _one_line_error(run(cli_env, "demo", "--dropout", "1.5"), "--dropout 1.5 must be in [0, 1)")
    _one_line_error(run(cli_env, "demo", "--agents", "2", "--secure-aggregation"), "--agents 3 or more")
    # More devices than descriptors: said before anything starts (even before the config is read).
    _one_line_error(run(cli_env, "simulate", "--devices", "10000000", "--processes", "1", "--config",
                        str(tmp_path / "none.toml")), "ulimit -n", "10000064")
    bad_profile = tmp_path / "fleet.toml"
    bad_profile.write_text("[[group]]\nname = 'pi'\nshare = 1.0\n[group.network]\nuplink_kbit_s = -5\n")
    _one_line_error(run(cli_env, "simulate", "--devices", "3", "--profile", str(bad_profile)),
                    "group \"pi\"", "network.uplink_kbit_s")
    bad_profile.write_text("[[group]]\nname = 'pi'\nshare = 1.0\ncompute.sped = 2\n")
    _one_line_error(run(cli_env, "simulate", "--devices", "3", "--profile", str(bad_profile)),
                    "compute.sped is not a known key")
    _one_line_error(run(cli_env, "simulate", "--devices", "3", "--time-scale", "0"), "--time-scale 0")
    _one_line_error(run(cli_env, "simulate", "--devices", "3", "--profile", "lunar"), "lunar")
    # A relayed job's mistakes: a device of a region with no root key to check the model; a relay for a job with
    # no relays, or without the root's key to believe it by; a root whose rule cannot be summed over regions.
    no_root = tmp_path / "region.toml"
    no_root.write_text(f"[agent]\nregion = 'east'\n[identity]\naggregator_key = '{KEY}'\n")
    _one_line_error(run(cli_env, "agent", "--config", str(no_root)), "identity.root_key is empty")
    relay_job = tmp_path / "relayed.toml"
    relay_job.write_text("[relays]\nmin_relays = 0\n")
    _one_line_error(run(cli_env, "relay", "--config", str(relay_job), "--region", "east", "--state-dir",
                        str(tmp_path / "r")), "relays.min_relays = 0")
    relay_job.write_text("[relays]\nmin_relays = 2\n")
    _one_line_error(run(cli_env, "relay", "--config", str(relay_job), "--region", "east", "--state-dir",
                        str(tmp_path / "r")), "relays.root_key is empty")
    relay_job.write_text("[relays]\nmin_relays = 2\n[server]\naggregation = 'median'\n[selection]\n"
                         "max_clients = 10\n")
    _one_line_error(run(cli_env, "aggregator", "--config", str(relay_job)), "server.aggregation = \"mean\"")
    deadline = tmp_path / "deadline.toml"
    deadline.write_text("[selection]\ndeadline_s = -5\n")
    _one_line_error(run(cli_env, "aggregator", "--config", str(deadline)),
                    "selection.deadline_s = -5 is out of range: use a number > 0")
    no_data = tmp_path / "data.toml"
    no_data.write_text(f"[data]\nfactory = 'mydata:load'\n[identity]\naggregator_key = '{KEY}'\n")
    _one_line_error(run(cli_env, "agent", "--config", str(no_data)), "data.factory 'mydata:load'",
                    "module 'mydata' not found")


@pytest.mark.parametrize(("argv", "words"), [
    (["--alpha", "-1"], "--alpha -1 is out of range: use a number > 0"),
    (["--alpha", "0.001"], "could not give every one of 10 clients"),
    (["--target-epsilon", "0"], "--target-epsilon 0 is out of range: use a number > 0 (the privacy budget)"),
    (["--rounds", "0"], "--rounds 0 is out of range: use at least 1"),
    (["--workers", "0"], "--workers 0 is out of range"),
])
def test_the_demos_flags_are_checked_before_it_starts(cli_env, argv, words):
    _one_line_error(run(cli_env, "demo", *argv, timeout=120), words)


def test_a_state_directory_that_cannot_be_written_stops_each_role_in_one_line(tmp_path, cli_env):
    # Under a regular file: unwritable even for root, whom chmod does not stop.
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"
    job = tmp_path / "job.toml"
    job.write_text(f"[job]\nstate_dir = '{state}'\n")
    agent = tmp_path / "agent.toml"
    agent.write_text(f"[agent]\nstate_dir = '{state}'\n[identity]\naggregator_key = '{KEY}'\n")
    for argv, key in ((["aggregator", "--config", str(job)], "job.state_dir"),
                      (["agent", "--config", str(agent)], "agent.state_dir"),
                      (["fleet", "--agents", "2", "--config", str(agent)], "agent.state_dir")):
        _one_line_error(run(cli_env, *argv, timeout=120), f"{key} '{state}' cannot be written",
                        f"{tmp_path / 'file'} is a file, not a directory", f"set {key} to a directory")
    assert (tmp_path / "file").read_text() == ""


# Flags kept out of --help on purpose: the old form of `fedge keys show`,
# where `fedge data fetch` downloads from instead of the public URL (tests,
# mirrors), and the slice of the fleet a `fedge simulate` child process runs.
HIDDEN = {"fedge keys show --key", "fedge data fetch --url", "fedge simulate --part"}


def test_every_flag_and_command_says_what_it_is_for():
    import argparse

    from fedge_cli.main import build_parser

    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                seen = set()
                for name, sub in action.choices.items():
                    if id(sub) in seen:
                        continue  # an alias (fedge fleet) of a command walked already
                    seen.add(id(sub))
                    if name not in helped:
                        yield f"{where} {name} (the command)", None
                    yield from walk(sub, f"{where} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield f"{where} {'/'.join(action.option_strings) or action.dest}", action.help

    helps = dict(walk(build_parser(), "fedge"))
    assert [flag for flag, text in helps.items() if not text] == []
    assert {flag for flag, text in helps.items() if text == argparse.SUPPRESS} == HIDDEN
    assert len(helps) > 100  # the walk reached every command's flags


def test_version(cli_env):
    proc = run(cli_env, "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fedge ")


def test_keys_enroll_revoke_and_devices_from_the_command_line(tmp_path, cli_env):
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "j"\nstate_dir = "{tmp_path / "state"}"\n')
    made = run(cli_env, "keys", "new", "--out", str(tmp_path / "dev.key"))
    assert made.returncode == 0 and made.stdout.startswith("ed25519:")
    assert (tmp_path / "dev.key").stat().st_mode & 0o777 == 0o600
    shown = run(cli_env, "keys", "show", str(tmp_path / "dev.key"))
    assert shown.returncode == 0 and shown.stdout == made.stdout and shown.stderr == ""
    # The old form still works, with a one-line note on stderr.
    old = run(cli_env, "keys", "show", "--key", str(tmp_path / "dev.key"))
    assert old.returncode == 0 and old.stdout == made.stdout
    assert old.stderr.count("\n") == 1 and "--key is deprecated" in old.stderr and "fedge keys show FILE" in old.stderr
    _one_line_error(run(cli_env, "keys", "show"), "fedge keys show FILE")
    _one_line_error(run(cli_env, "keys", "show", str(tmp_path / "missing.key")), "missing.key")
    assert run(cli_env, "enroll", "--config", str(job), "dev-1", str(tmp_path / "dev.pub")).returncode == 0
    registry = (tmp_path / "state" / "devices.json").read_bytes()
    same = run(cli_env, "enroll", "--config", str(job), "dev-1", made.stdout.strip())  # the key it has: nothing to do
    assert same.returncode == 0 and same.stderr == "", same.stderr
    assert same.stdout.count("\n") == 1 and "dev-1 is already enrolled with this key" in same.stdout
    assert (tmp_path / "state" / "devices.json").read_bytes() == registry
    other = run(cli_env, "keys", "new", "--out", str(tmp_path / "other.key")).stdout.strip()
    again = run(cli_env, "enroll", "--config", str(job), "dev-1", other)  # another key: a deliberate act
    assert again.returncode == 2 and "--replace" in again.stderr and len(again.stderr.splitlines()) == 1
    assert run(cli_env, "revoke", "--config", str(job), "dev-1").returncode == 0
    listed = json.loads(run(cli_env, "devices", "--config", str(job), "--json").stdout)
    assert listed[0]["id"] == "dev-1" and "revoked_at" in listed[0]
    bad = run(cli_env, "enroll", "--config", str(job), "dev-2", "ed25519:shortkey")
    assert bad.returncode == 2 and "32 bytes" in bad.stderr and len(bad.stderr.splitlines()) == 1

    # A fleet from a file, in one write: all or nothing, each bad line named.
    keys = [run(cli_env, "keys", "new", "--out", str(tmp_path / f"pi-{i}.key")).stdout.strip() for i in range(3)]
    fleet = tmp_path / "fleet.txt"
    fleet.write_text(f"# the kitchen\npi-0 {keys[0]}\npi-1 {tmp_path / 'pi-1.pub'}\n\npi-2 {keys[2]}  # spare\n")
    first = run(cli_env, "enroll", "--config", str(job), "--from", str(fleet))
    assert first.returncode == 0 and first.stdout.strip() == "enrolled 3 devices", first.stderr
    again = run(cli_env, "enroll", "--config", str(job), "--from", str(fleet))
    assert again.returncode == 0 and "3 already enrolled with the same key, unchanged" in again.stdout
    fleet.write_text(f"pi-3 {keys[0]}\npi-4 nokey\n")
    for args, says in ((["--from", str(fleet)], "fleet.txt:2:"),
                       (["--from", str(tmp_path / "none.txt")], "none.txt"),
                       (["--from", str(fleet), "pi-9", keys[0]], "not both"),
                       (["pi-9"], "--from FILE")):
        _one_line_error(run(cli_env, "enroll", "--config", str(job), *args), says)
    fleet.write_text(f"pi-3 {keys[0]}\n")  # pi-0's key
    _one_line_error(run(cli_env, "enroll", "--config", str(job), "--from", str(fleet)), "already enrolled as pi-0")
    assert {d["id"] for d in json.loads(run(cli_env, "devices", "--config", str(job), "--json").stdout)} == {
        "dev-1", "pi-0", "pi-1", "pi-2"}


def test_keys_rotate_makes_the_aggregators_next_key_once(tmp_path, cli_env):
    from fedge.identity import Identity

    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "j"\nstate_dir = "{tmp_path / "state"}"\n')
    none = run(cli_env, "keys", "rotate", "--config", str(job))
    assert none.returncode == 2 and "no key file" in none.stderr and len(none.stderr.splitlines()) == 1
    Identity.generate().save(tmp_path / "state" / "aggregator.key")
    made = run(cli_env, "keys", "rotate", "--config", str(job))
    assert made.returncode == 0 and made.stdout.startswith("ed25519:") and "restart the aggregator" in made.stderr
    nxt = tmp_path / "state" / "aggregator.key.next"
    assert Identity.load(nxt).public.to_text() == made.stdout.strip()
    twice = run(cli_env, "keys", "rotate", "--config", str(job))
    assert twice.returncode == 2 and "already exists" in twice.stderr
