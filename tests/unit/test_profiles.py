"""Fleet profiles (edge_agent.sim.profiles): the file format and its checks,
the presets, the per-device draws and the online/offline schedule. Every
random draw here comes from a fixed seed, so the tolerances cannot flake."""

import json
import math
import random
import statistics
import sys
import textwrap

import pytest

from edge_agent.sim import profiles
from edge_agent.sim.profiles import Availability, Dist, ProfileError, load, parse

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

GROUP = '[[group]]\nname = "g"\nshare = 1.0\n'


def from_text(text: str, source: str = "fleet.toml") -> profiles.Profile:
    return parse(tomllib.loads(text), source)


def one_group(text: str = "") -> profiles.Group:
    return from_text(GROUP + text).groups[0]


# --- presets -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", profiles.preset_names())
def test_every_preset_loads_and_describes_itself(name):
    profile = load(name)
    assert profile.name == name and profile.description
    assert math.isclose(sum(g.share for g in profile.groups), 1.0)
    data = json.loads(json.dumps(profile.to_json()))
    assert data["name"] == name and len(data["groups"]) == len(profile.groups)
    for conditions in profile.devices(200, seed=1):
        assert conditions.speed > 0 and conditions.latency_s >= 0
        assert conditions.uplink_bytes_s >= 0 and conditions.downlink_bytes_s >= 0
        assert 0 <= conditions.crash_in_training <= 1 and 0 <= conditions.drop_in_upload <= 1


def test_the_presets_are_ordered_from_even_to_unequal():
    assert profiles.preset_names() == ["lab", "home-wifi", "cellular-mixed"]


def test_lab_is_todays_conditions():
    (group,) = load("lab").groups
    assert group.always_on and group.online is None and group.daily_amplitude == 0
    for c in load("lab").devices(20, seed=5):
        assert (c.speed, c.uplink_bytes_s, c.downlink_bytes_s, c.latency_s) == (1.0, 0.0, 0.0, 0.0)
        assert c.always_on and c.crash_in_training == 0 and c.drop_in_upload == 0


def test_cellular_mixed_spans_the_issues_numbers():
    # Issue 29: speed differs 5-10x, uplinks about 0.1 to 10 Mbit/s, latencies 50-500 ms.
    profile = load("cellular-mixed")
    devices = profile.devices(3000, seed=2)
    assert min(c.uplink_bytes_s for c in devices) >= 100_000 / 8
    assert max(c.uplink_bytes_s for c in devices) <= 10_000_000 / 8
    assert min(c.latency_s for c in devices) >= 0.05 and max(c.latency_s for c in devices) <= 0.5
    medians = {g.name: statistics.median(c.speed for c in devices if c.group == g.name) for g in profile.groups}
    assert 5 <= max(medians.values()) / min(medians.values()) <= 10
    assert all(not g.always_on and g.daily_amplitude > 0 for g in profile.groups)
    assert all(0.01 <= g.crash_in_training <= 0.03 and 0.01 <= g.drop_in_upload <= 0.05 for g in profile.groups)


def test_home_wifi_is_pis_with_a_minority_of_jetsons():
    profile = load("home-wifi")
    pi, jetson = profile.groups
    assert pi.share > jetson.share
    assert pi.speed.mean / jetson.speed.mean >= 4
    assert pi.online is not None and pi.offline is not None and pi.online.mean > 3600 > pi.offline.mean


def test_the_documented_example_is_a_valid_profile():
    text = profiles.__doc__.split("A complete example, with every key::\n")[1].split("\nWhat the keys mean")[0]
    profile = from_text(textwrap.dedent(text))
    assert profile.name == "cellular-mixed"
    assert [g.name for g in profile.groups] == ["pi-lte", "jetson-lte"]
    pi = profile.group("pi-lte")
    assert pi.speed.describe() == "lognormal(median 8, sigma 0.4) in [2, 40]"
    assert (pi.daily_amplitude, pi.peak_hour, pi.always_on) == (0.5, 20.0, False)
    assert pi.restart == Dist.constant(30)


# --- defaults and distributions -----------------------------------------------------------


def test_everything_but_name_and_share_has_a_default():
    profile = from_text(GROUP, source="dir/my-fleet.toml")
    assert profile.name == "my-fleet" and profile.description == ""
    g = profile.groups[0]
    assert g.speed == Dist.constant(1) and g.uplink == g.downlink == g.latency == Dist.constant(0)
    assert g.always_on and g.online is None and g.offline is None
    assert (g.crash_in_training, g.drop_in_upload, g.restart) == (0.0, 0.0, Dist.constant(10))


def test_a_bare_number_is_a_constant_and_draws_nothing():
    g = one_group("compute.speed = 2\nnetwork.uplink_kbit_s = 8\nnetwork.latency_ms = 250\n")
    assert g.speed == Dist("constant", {"value": 2.0}, None, None)
    rng = random.Random(1)
    state = rng.getstate()
    c = g.conditions(rng)
    assert rng.getstate() == state
    assert (c.speed, c.uplink_bytes_s, c.downlink_bytes_s, c.latency_s) == (2.0, 1000.0, 0.0, 0.25)


@pytest.mark.parametrize("dist, text", [
    (Dist.constant(30), "constant 30"),
    (Dist("uniform", {"low": 100, "high": 5000}), "uniform(low 100, high 5000)"),
    (Dist("lognormal", {"median": 8, "sigma": 0.4}, 2, 40), "lognormal(median 8, sigma 0.4) in [2, 40]"),
    (Dist("exponential", {"mean": 3600}, 60, None), "exponential(mean 3600) at least 60"),
    (Dist("normal", {"mean": 10, "sd": 2}, None, 12), "normal(mean 10, sd 2) at most 12"),
])
def test_describe(dist, text):
    assert dist.describe() == text


@pytest.mark.parametrize("dist, mean", [
    (Dist("uniform", {"low": 2, "high": 6}), 4.0),
    (Dist("lognormal", {"median": 8, "sigma": 0.4}), 8 * math.exp(0.08)),
    (Dist("exponential", {"mean": 5}), 5.0),
    (Dist("normal", {"mean": 10, "sd": 2}), 10.0),
    # clamped: half the draws are 5, the other half average 2.5
    (Dist("uniform", {"low": 0, "high": 10}, None, 5), 3.75),
])
def test_the_empirical_mean_matches(dist, mean):
    rng = random.Random("mean-test")
    draws = [dist.sample(rng) for _ in range(20000)]
    assert statistics.fmean(draws) == pytest.approx(mean, rel=0.02)
    assert dist.mean == pytest.approx(mean, rel=0.03)  # exact, or 4000 draws from a fixed seed when clamped


def test_draws_stay_within_the_clamps():
    g = one_group("""
compute.speed = { dist = "lognormal", median = 8, sigma = 2, min = 2, max = 40 }
network.uplink_kbit_s = { dist = "normal", mean = 100, sd = 400, min = 50, max = 300 }
network.downlink_kbit_s = { dist = "uniform", low = 1000, high = 2000 }
network.latency_ms = { dist = "exponential", mean = 100, max = 250 }
""")
    rng = random.Random(3)
    devices = [g.conditions(rng) for _ in range(3000)]
    assert all(2 <= c.speed <= 40 for c in devices)
    assert all(50 * 125 <= c.uplink_bytes_s <= 300 * 125 for c in devices)
    assert all(1000 * 125 <= c.downlink_bytes_s <= 2000 * 125 for c in devices)
    assert all(0 <= c.latency_s <= 0.25 for c in devices)
    # the clamps bite: some draws sit on each bound
    assert min(c.speed for c in devices) == 2 and max(c.speed for c in devices) == 40
    assert max(c.latency_s for c in devices) == 0.25


# --- devices ------------------------------------------------------------------------------

THREE = """
[[group]]
name = "a"
share = 0.6
compute.speed = { dist = "uniform", low = 1, high = 2 }
[[group]]
name = "b"
share = 0.3
compute.speed = { dist = "uniform", low = 5, high = 6 }
[[group]]
name = "c"
share = 0.1
compute.speed = 10
"""


def test_devices_are_deterministic_for_n_and_seed():
    profile = from_text(THREE)
    assert profile.devices(50, seed=3) == profile.devices(50, seed=3)
    assert profile.devices(50, seed=3) != profile.devices(50, seed=4)
    assert from_text(THREE).devices(50, seed=3) == profile.devices(50, seed=3)


@pytest.mark.parametrize("n, counts", [(10, (6, 3, 1)), (7, (4, 2, 1)), (1, (1, 0, 0)), (0, (0, 0, 0)),
                                       (1000, (600, 300, 100)), (3, (2, 1, 0))])
def test_each_group_gets_exactly_its_share(n, counts):
    devices = from_text(THREE).devices(n, seed=9)
    assert len(devices) == n
    assert tuple(sum(1 for c in devices if c.group == name) for name in "abc") == counts


def test_membership_is_shuffled_and_draws_follow_the_group():
    devices = from_text(THREE).devices(30, seed=1)
    assert [c.group for c in devices] != sorted(c.group for c in devices)
    ranges = {"a": (1, 2), "b": (5, 6), "c": (10, 10)}
    assert all(ranges[c.group][0] <= c.speed <= ranges[c.group][1] for c in devices)


def test_a_device_draws_from_its_own_seeded_stream():
    profile = from_text(GROUP + 'compute.speed = { dist = "uniform", low = 1, high = 2 }\n')
    devices = profile.devices(5, seed=7)
    assert devices[3].speed == profile.groups[0].conditions(random.Random("7/3/conditions")).speed


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_a_bad_device_count_is_refused(n):
    with pytest.raises(ValueError, match="number of devices"):
        from_text(THREE).devices(n, seed=0)


def test_group_by_name():
    profile = from_text(THREE)
    assert profile.group("b").share == 0.3
    with pytest.raises(ProfileError, match=r"no group 'd' \(groups: a, b, c\)"):
        profile.group("d")


def test_dists_and_groups_are_hashable_values():
    assert hash(one_group()) == hash(one_group())
    assert len({load("cellular-mixed"), load("cellular-mixed")}) == 1


# --- bad input ----------------------------------------------------------------------------

BAD = [
    # unknown keys, with the known ones listed
    ("colour = 1\n" + GROUP, "colour is not a known key (known: name, description, group)"),
    (GROUP + "sahre = 1\n", 'group "g": sahre is not a known key (known: name, share, compute,'),
    (GROUP + "[group.compute]\nsped = 2\n", 'group "g": compute.sped is not a known key (known: speed)'),
    (GROUP + "network.uplink = 5\n", "network.uplink is not a known key (known: uplink_kbit_s, downlink_kbit_s,"),
    (GROUP + "failures.crash = 0.1\n", "failures.crash is not a known key (known: crash_in_training,"),
    (GROUP + 'network.latency_ms = { dist = "uniform", low = 1, high = 2, mean = 3 }\n',
     "network.latency_ms.mean is not a known key (known: dist, low, high, min, max)"),
    (GROUP + "availability.daily_cycle = { amp = 0.5 }\n",
     "availability.daily_cycle.amp is not a known key (known: amplitude, peak_hour)"),
    (GROUP + '"odd\\nkey" = 1\n', '"odd\\nkey" is not a known key'),
    # distributions that are not
    (GROUP + 'network.latency_ms = { dist = "gamma", shape = 2 }\n', 'network.latency_ms.dist "gamma" is not known'),
    (GROUP + "network.latency_ms = { low = 1, high = 2 }\n", "network.latency_ms: dist is missing"),
    (GROUP + 'network.latency_ms = { dist = "uniform", low = 1 }\n',
     "network.latency_ms: uniform needs low and high; high is missing"),
    (GROUP + 'network.latency_ms = "fast"\n', 'network.latency_ms must be a number or a distribution'),
    # wrong types
    ('[[group]]\nname = "g"\nshare = "1"\n', 'group "g": share must be a number, got string "1"'),
    ('[[group]]\nname = "g"\nshare = 1979-05-27\n', "share must be a number, got date/time"),
    (GROUP + "compute.speed = true\n", "compute.speed must be a number or a distribution"),
    (GROUP + 'compute.speed = { dist = "constant", value = true }\n',
     "compute.speed.value must be a number, got boolean true"),
    (GROUP + "failures.crash_in_training = true\n", "failures.crash_in_training must be a number, got boolean"),
    (GROUP + "availability.always_on = 1\n", "availability.always_on must be true or false, got integer 1"),
    (GROUP + "network = 5\n", 'group "g": network must be a table, got integer 5'),
    ("description = 5\n" + GROUP, "description must be a string, got integer 5"),
    ("name = 5\n" + GROUP, "name must be a non-empty string"),
    # negative values, probabilities above 1
    (GROUP + "network.latency_ms = -5\n", "network.latency_ms = -5 is out of range"),
    (GROUP + 'network.uplink_kbit_s = { dist = "uniform", low = -10, high = 100 }\n',
     "network.uplink_kbit_s: uniform(low -10, high 100) can draw values below 0; give a min of 0 or more"),
    (GROUP + 'network.downlink_kbit_s = { dist = "normal", mean = 1000, sd = 200 }\n',
     "network.downlink_kbit_s: normal(mean 1000, sd 200) can draw values below 0"),
    (GROUP + 'network.latency_ms = { dist = "uniform", low = -10, high = -1 }\n',
     "network.latency_ms: uniform(low -10, high -1) is always below 0"),
    (GROUP + 'failures.restart_s = { dist = "constant", value = -1 }\n', "failures.restart_s: constant -1 is always"),
    (GROUP + "failures.drop_in_upload = -0.1\n", "failures.drop_in_upload = -0.1 is out of range: use a number in "
     "[0, 1]"),
    (GROUP + "failures.crash_in_training = 1.5\n", "failures.crash_in_training = 1.5 is out of range"),
    # NaN, infinities, numbers too large to mean anything
    ('[[group]]\nname = "g"\nshare = nan\n', 'group "g": share = nan: use a finite number'),
    (GROUP + "network.latency_ms = inf\n", "network.latency_ms = inf: use a finite number"),
    (GROUP + 'compute.speed = { dist = "normal", mean = -inf, sd = 1, min = 1 }\n',
     "compute.speed.mean = -inf: use a finite number"),
    (GROUP + "network.uplink_kbit_s = 1e13\n", "network.uplink_kbit_s = 1e+13 is out of range"),
    (GROUP + "network.uplink_kbit_s = 1" + "0" * 400 + "\n", "network.uplink_kbit_s = 1000"),
    # parameters out of their range
    (GROUP + 'network.uplink_kbit_s = { dist = "uniform", low = 500, high = 100 }\n',
     'group "g": network.uplink_kbit_s: low 500 is above high 100'),
    (GROUP + 'compute.speed = { dist = "lognormal", median = 8, sigma = -0.1 }\n', "compute.speed.sigma = -0.1"),
    (GROUP + 'compute.speed = { dist = "lognormal", median = 8, sigma = 11 }\n', "compute.speed.sigma = 11"),
    (GROUP + 'compute.speed = { dist = "lognormal", median = 0, sigma = 1 }\n', "compute.speed.median = 0"),
    (GROUP + 'network.latency_ms = { dist = "normal", mean = 5, sd = -1, min = 0 }\n', "network.latency_ms.sd = -1"),
    (GROUP + 'failures.restart_s = { dist = "exponential", mean = 0 }\n', "failures.restart_s.mean = 0 is out of"),
    (GROUP + 'network.latency_ms = { dist = "normal", mean = 5, sd = 1, min = 3, max = 2 }\n',
     "network.latency_ms: min 3 is above max 2"),
    # speed must stay above 0
    (GROUP + "compute.speed = 0\n", "compute.speed = 0 is out of range: use a number in (0,"),
    (GROUP + 'compute.speed = { dist = "constant", value = 0 }\n', "compute.speed = 0 is out of range"),
    (GROUP + 'compute.speed = { dist = "normal", mean = 5, sd = 1 }\n',
     "compute.speed: normal(mean 5, sd 1) can draw values below 0; it must stay above 0: give a min above 0"),
    (GROUP + 'compute.speed = { dist = "normal", mean = 5, sd = 1, min = 0 }\n', "compute.speed: normal(mean 5, "
     "sd 1) at least 0 can draw 0"),
    (GROUP + 'compute.speed = { dist = "uniform", low = 0, high = 2 }\n', "compute.speed: uniform(low 0, high 2) "
     "can draw 0"),
    # sessions
    (GROUP + "availability.online_s = 0\navailability.offline_s = 60\n", "availability.online_s = 0 is out of "
     "range: use a number in (0,"),
    (GROUP + 'availability.online_s = 60\navailability.offline_s = { dist = "uniform", low = 0, high = 0 }\n',
     "availability.offline_s: uniform(low 0, high 0) is always 0; its mean must be above 0"),
    (GROUP + 'availability.online_s = { dist = "exponential", mean = 0 }\navailability.offline_s = 1\n',
     "availability.online_s.mean = 0 is out of range"),
    (GROUP + "availability.online_s = 60\n", "availability.offline_s is missing: give it with online_s"),
    (GROUP + "availability.always_on = false\n", "availability.always_on = false needs online_s and offline_s"),
    (GROUP + "availability.daily_cycle = { amplitude = 1 }\n",
     "availability.daily_cycle.amplitude = 1 is out of range: use a number in [0, 1)"),
    (GROUP + "availability.daily_cycle = { peak_hour = 24 }\n", "availability.daily_cycle.peak_hour = 24 is out of"),
    # groups
    ('[[group]]\nname = "g"\nshare = 0.5\n[[group]]\nname = "h"\nshare = 0.4\n',
     "the groups' share values add up to 0.9 (g 0.5, h 0.4); they must add up to 1"),
    (GROUP + GROUP.replace("1.0", "0.0"), 'group "g": share = 0 is out of range'),
    ('[[group]]\nname = "g"\nshare = 0.5\n[[group]]\nname = "g"\nshare = 0.5\n',
     'group "g" is both group 1 and group 2: group names must be unique'),
    ('name = "empty"\n', "no [[group]]: a profile needs at least one group"),
    ("group = []\n", "no [[group]]"),
    ('[group]\nname = "g"\nshare = 1.0\n', "group must be an array of tables (write [[group]]), got a table"),
    ("group = [1]\n", "group 1 must be a table ([[group]]), got integer 1"),
    ('[[group]]\nname = "Pi LTE"\nshare = 1.0\n', 'group 1: name "Pi LTE" must be a string of lowercase letters'),
    ("[[group]]\nshare = 1.0\n", "group 1: name is missing"),
    ('[[group]]\nname = "g"\n', 'group "g": share is missing'),
]


@pytest.mark.parametrize("text, needle", BAD, ids=[f"{i}-{needle[:40]}" for i, (_, needle) in enumerate(BAD)])
def test_bad_input_is_one_line_naming_the_key(tmp_path, text, needle):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert needle in message
    assert "\n" not in message and isinstance(err.value, ValueError)


@pytest.mark.parametrize("text", [
    'network.latency_ms = { dist = "normal", mean = 10, sd = 50, min = 0 }\n',  # clamped at 0: fine
    'network.latency_ms = { dist = "uniform", low = -10, high = -1, min = 0 }\n',
    'compute.speed = { dist = "normal", mean = 5, sd = 3, min = 0.5 }\n',
    'compute.speed = { dist = "uniform", low = -1, high = 2, min = 0.1 }\n',
    'compute.speed = { dist = "exponential", mean = 2 }\n',
    "availability.always_on = true\navailability.online_s = 60\n",  # sessions ignored when forced on
    "availability.online_s = { dist = \"uniform\", low = 0, high = 60 }\navailability.offline_s = 1\n",
    "failures.crash_in_training = 1\nfailures.drop_in_upload = 0\nfailures.restart_s = 0\n",
])
def test_edge_values_that_are_allowed(text):
    one_group(text)


# --- files --------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ProfileError) as err:
        load(str(path))
    assert str(path) in str(err.value) and "neither a file nor a preset (lab, home-wifi, cellular-mixed)" in str(
        err.value)


def test_invalid_toml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[[group]\nname = "g"\n')
    with pytest.raises(ProfileError) as err:
        load(str(path))
    assert str(err.value).startswith(f"{path}: not valid TOML: ") and "\n" not in str(err.value)


def test_an_unreadable_path_is_named(tmp_path):
    with pytest.raises(ProfileError, match="cannot be read"):
        load(str(tmp_path))
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ProfileError) as err:
        load(str(path))
    assert str(err.value).startswith(f"{path}: cannot be read")


def test_a_file_loads_with_its_stem_as_name(tmp_path):
    path = tmp_path / "lab"  # named like a preset: loaded by its path
    path.write_text(GROUP + "compute.speed = 3\n")
    assert load(str(path)).groups[0].speed == Dist.constant(3)
    assert load(f"{tmp_path}/lab").name == "lab"
    (tmp_path / "my-fleet.toml").write_text(GROUP)
    assert load(str(tmp_path / "my-fleet.toml")).name == "my-fleet"


# --- availability -------------------------------------------------------------------------

SESSIONS = "availability.online_s = 100\navailability.offline_s = 50\n"


def test_always_on_never_changes():
    for text in ("", "availability.always_on = true\n" + SESSIONS):
        av = Availability(one_group(text), random.Random(1), start_online=False)
        assert av.online and av.always_on
        assert av.next_change(0.0) is None
        assert av.advance(1e9) is True


def test_sessions_alternate():
    av = Availability(one_group(SESSIONS), random.Random(1), start_online=True)
    assert not av.always_on
    assert av.next_change(0.0) == 100.0
    assert av.advance(99.0) is True  # not yet
    assert av.advance(100.0) is False
    assert av.next_change(100.0) == 150.0
    assert av.advance(150.0) is True
    assert av.next_change(150.0) == 250.0


def test_a_late_advance_keeps_the_schedule():
    av = Availability(one_group(SESSIONS), random.Random(1), start_online=True)
    av.next_change(0.0)
    assert av.advance(120.0) is False
    assert av.next_change(120.0) == 150.0  # the offline session began at 100, not at 120


def schedule(av: Availability, flips: int) -> list[float]:
    out, now = [], 0.0
    for _ in range(flips):
        change = av.next_change(now)
        assert change is not None and change >= now
        av.advance(change)
        out.append(change)
        now = change
    return out


def test_the_schedule_is_deterministic():
    group = one_group('availability.online_s = { dist = "exponential", mean = 600 }\n'
                      'availability.offline_s = { dist = "lognormal", median = 120, sigma = 0.5 }\n'
                      "availability.daily_cycle = {}\n")
    assert (group.daily_amplitude, group.peak_hour) == (0.5, 20.0)  # the documented defaults of the table
    first = schedule(Availability(group, random.Random("d/1")), 40)
    assert first == schedule(Availability(group, random.Random("d/1")), 40)
    assert first != schedule(Availability(group, random.Random("d/2")), 40)
    assert len(set(first)) == 40


def test_the_start_is_online_with_the_long_run_probability():
    group = one_group("availability.online_s = 300\navailability.offline_s = 100\n")
    online = sum(Availability(group, random.Random(f"start/{i}")).online for i in range(4000))
    assert online / 4000 == pytest.approx(0.75, abs=0.03)


def test_the_daily_cycle_lengthens_online_sessions_near_the_peak():
    group = one_group("availability.online_s = 3600\navailability.offline_s = 600\n"
                      "availability.daily_cycle = { amplitude = 0.5, peak_hour = 20.0 }\n")
    peak, trough = 20 * 3600.0, 8 * 3600.0
    assert Availability(group, random.Random(1), True).next_change(peak) == pytest.approx(peak + 5400)
    assert Availability(group, random.Random(1), True).next_change(trough) == pytest.approx(trough + 1800)
    assert Availability(group, random.Random(1), False).next_change(peak) == pytest.approx(peak + 400)
    assert Availability(group, random.Random(1), False).next_change(trough) == pytest.approx(trough + 1200)
    # the next day at the same hour: the same factor
    assert Availability(group, random.Random(1), True).next_change(peak + 86400) == pytest.approx(peak + 86400 + 5400)
    # a drawn length too: the same draw, three times longer at the peak than at the trough
    drawn = one_group('availability.online_s = { dist = "exponential", mean = 3600 }\n'
                      "availability.offline_s = 600\n"
                      "availability.daily_cycle = { amplitude = 0.5, peak_hour = 20.0 }\n")
    at_peak = Availability(drawn, random.Random(5), True).next_change(peak) - peak
    at_trough = Availability(drawn, random.Random(5), True).next_change(trough) - trough
    assert at_peak == pytest.approx(3 * at_trough)
