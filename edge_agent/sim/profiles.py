"""Fleet profiles: how unequal and how intermittent the simulated devices are.

A real fleet is not a rack of identical machines: Raspberry Pis train next to
Jetsons several times faster, some sit on home Wi-Fi and some on LTE or
NB-IoT, and devices come and go. ``fedge simulate`` runs every simulated
device on one host; a *fleet profile* tells it, per device, how fast the
device trains, how fast and how far away its network is, when it is online,
and how often it fails. A profile is a TOML file, or the name of one of the
presets shipped with fedge (``lab``, ``home-wifi``, ``cellular-mixed``; see
the end of this page).

Groups
------

A profile divides the fleet into *groups*, one per class of device (say,
"Pis on LTE"). Each group has a ``share`` of the fleet; the shares must add
up to 1. With N devices, a group gets exactly its share of N, rounded so that
the groups add up to N (largest remainder: 0.6, 0.3 and 0.1 of 7 devices are
4, 2 and 1). Which device lands in which group is shuffled, and then each
device draws its own conditions from its group's distributions: two devices
of a group differ as two real Pis on different LTE cells do.

Everything is drawn from the seed of the run: the same profile, the same
number of devices and the same seed give every device the same group and the
same conditions on every run and every host.

The file
--------

A complete example, with every key::

    name = "cellular-mixed"        # optional; default: the file name without .toml
    description = "Pis and Jetsons on LTE and NB-IoT"   # optional

    [[group]]                      # one [[group]] per class of device
    name = "pi-lte"                # required: lowercase letters, digits, _ and -; unique
    share = 0.6                    # required: the fraction of the fleet in this group

    [group.compute]
    speed = { dist = "lognormal", median = 8.0, sigma = 0.4, min = 2.0, max = 40.0 }

    [group.network]
    uplink_kbit_s = { dist = "uniform", low = 100, high = 5000 }
    downlink_kbit_s = { dist = "uniform", low = 1000, high = 20000 }
    latency_ms = { dist = "lognormal", median = 120, sigma = 0.5, max = 600 }

    [group.availability]
    online_s = { dist = "exponential", mean = 3600 }
    offline_s = { dist = "exponential", mean = 900 }
    daily_cycle = { amplitude = 0.5, peak_hour = 20.0 }
    always_on = false

    [group.failures]
    crash_in_training = 0.02
    drop_in_upload = 0.01
    restart_s = { dist = "constant", value = 30 }

    [[group]]
    name = "jetson-lte"
    share = 0.4
    compute.speed = { dist = "lognormal", median = 1.2, sigma = 0.2, min = 0.8 }
    network.uplink_kbit_s = { dist = "uniform", low = 2000, high = 10000 }
    # no [group.availability]: always online; no [group.failures]: never fails

What the keys mean, and their defaults when left out:

``compute.speed`` (default 1)
    How many times longer a training run takes on the device than it takes
    on the simulating host when one device trains alone there. Despite the
    name, a larger number is a *slower* device: 8 is a device that needs 8
    times the host's training time, 1 is as fast as the host, 0.5 twice as
    fast. It must be above 0: a distribution that could draw 0 or less is
    refused unless its ``min`` is above 0.

``network.uplink_kbit_s``, ``network.downlink_kbit_s`` (default 0: unlimited)
    The device's link to the broker in kilobit per second (1000 bit/s), up
    (device to broker: its updates) and down (broker to device: the
    models). 0 means no limit, so a distribution clamped at ``min = 0``
    makes every device that draws 0 unlimited: clamp at a small positive
    rate instead.

``network.latency_ms`` (default 0)
    One-way delay in milliseconds, added in each direction.

``availability.online_s``, ``availability.offline_s`` (default: always online)
    A device alternates between online sessions and offline ones (an
    offline device is disconnected from the broker); each session's length
    in seconds is a fresh draw. Give both or neither; each must have a mean
    above 0. Leaving both out, leaving out the whole table, or
    ``always_on = true`` makes the group always online (with
    ``always_on = true`` the session keys may stay in the file and are
    ignored). At the start of a run each device is online with the
    long-run probability mean(online_s) / (mean(online_s) + mean(offline_s)).

``availability.daily_cycle`` (default: none)
    ``{ amplitude = a, peak_hour = p }`` (defaults 0.5 and 20.0 when the table
    is given): a session that starts at hour h of the day (fleet time 0 is
    midnight) lasts 1 + a cos(2 pi (h - p) / 24) times its drawn length if it
    is an online session, and that many times shorter if it is an offline
    one. With a = 0.5 and p = 20, online sessions starting at 20:00 are 1.5
    times as long and those starting at 08:00 half as long. ``a`` is in
    [0, 1), ``p`` in [0, 24).

``availability.always_on`` (default false)
    true: always online, whatever else the table says.

``failures.crash_in_training`` (default 0)
    The probability, per training run, that the device crashes during it:
    its result is lost and it restarts.

``failures.drop_in_upload`` (default 0)
    The probability, per update, that the connection is lost while the
    update is being sent.

``failures.restart_s`` (default 10)
    How long a crashed device takes to come back, in seconds.

Distributions
-------------

A number that varies from device to device (or from session to session) is
given as a distribution, an inline table::

    { dist = "constant", value = 30 }
    { dist = "uniform", low = 100, high = 5000 }        # every value in [low, high] equally likely
    { dist = "lognormal", median = 8, sigma = 0.4 }     # median * e^(sigma * z), z standard normal
    { dist = "exponential", mean = 3600 }               # memoryless waiting times
    { dist = "normal", mean = 10, sd = 2 }

A bare number is a constant: ``speed = 2`` is ``{ dist = "constant", value = 2 }``.
Each may add ``min`` and/or ``max``: a draw below ``min`` counts as ``min``,
one above ``max`` as ``max``. A lognormal's ``sigma`` is the spread of the
logarithm: sigma 0.4 puts about two devices in three within a factor
e^0.4 = 1.5 of the median.

Every value a profile describes must be at least 0 (speed, and the mean of
an online or offline session, above 0), and the file is checked for it: a
distribution that can draw a value below 0 (a normal, a uniform reaching
below 0) must have a ``min`` of 0 or more. A probability is a plain number in
[0, 1].

Checks
------

A profile is checked when it is loaded, and a mistake stops the run with one
line that names the file, the group and the key, e.g.::

    fleet.toml: group "pi-lte": network.uplink_kbit_s: low 500 is above high 100
    fleet.toml: group "pi-lte": compute.sped is not a known key (known: speed)

Refused: unknown keys (in any table), a string or a boolean where a number
goes, NaN or infinity, numbers beyond 1e12 in size, a lognormal sigma above
10, negative values and probabilities above 1, a uniform with low above
high, a min above its max, a lognormal median or an exponential mean not
above 0, a negative sigma or sd, shares that do not add up to 1 (within
1e-6), two groups with one name, a profile without a group, and a file
that cannot be read or is not valid TOML.

Presets
-------

``lab``
    One group, every device as fast as the host, no network limits, always
    online, no failures: the conditions of a simulation without a profile.

``home-wifi``
    Raspberry Pi 4-class devices (80%) and Jetsons (20%) on home Wi-Fi
    (uplinks 2-20 Mbit/s, downlinks 10-100 Mbit/s, 5-40 ms), online for
    hours at a time with offline gaps of tens of minutes, rare failures.

``cellular-mixed``
    The most unequal: Jetsons and Pis on LTE and Pis on NB-IoT or weak LTE
    (uplinks from 0.1 to 10 Mbit/s, 50-500 ms, compute 5-10 times apart),
    online for minutes to an hour with a daily cycle, failures of a few
    percent.

Their TOML text, with where each number comes from, is in ``PRESETS``
(edge_agent/sim/profiles.py). The numbers are assumptions, plausible for such
devices rather than measured on a fleet; copy a preset into a file to change
them. A file named like a preset is loaded by its path (``./lab``).

In Python
---------

``load(name_or_path)`` gives a ``Profile``; ``Profile.devices(n, seed)`` the
``DeviceConditions`` of devices 0 to n-1 (rates in bytes per second, latency
in seconds); ``Availability(group, rng)`` one device's online/offline
schedule; ``Profile.to_json()`` the whole profile, each distribution in
words, for benchmark results.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

from fedge.config import DECAY, FRACTION, NON_NEGATIVE, POSITIVE, Range
from fedge.errors import OneReasonError, one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (a Jetson's JetPack 6): the same parser, from PyPI
    import tomli as tomllib

__all__ = ["PRESETS", "Availability", "DeviceConditions", "Dist", "Group", "Profile", "ProfileError", "load",
           "parse", "preset_names"]


class ProfileError(OneReasonError):
    """A fleet profile that cannot be used: one line naming the file, the
    group and the key."""

    default_reason = "profile"


# --- distributions ---------------------------------------------------------------

# Each distribution's parameters, in the order they are written and described.
PARAMS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "uniform": ("low", "high"),
    "lognormal": ("median", "sigma"),
    "exponential": ("mean",),
    "normal": ("mean", "sd"),
}
LIMIT = 1e12  # the largest number (in size) a profile may hold: every draw stays finite
MAX_SIGMA = 10.0  # a lognormal spread of e^10 per sigma is already absurd; more could overflow
ANY = Range(-LIMIT, LIMIT)
_PARAM_RANGES: dict[tuple[str, str], Range] = {
    ("lognormal", "median"): Range(0, LIMIT, lo_open=True),
    ("lognormal", "sigma"): Range(0, MAX_SIGMA),
    ("exponential", "mean"): Range(0, LIMIT, lo_open=True),
    ("normal", "sd"): Range(0, LIMIT),
}
MEAN_DRAWS = 4000  # draws behind the mean of a clamped distribution (fixed seed: the same mean every time)


def _g(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Dist:
    """A distribution as the profile wrote it: ``kind`` (a key of
    ``PARAMS``), its ``params`` and the clamps ``lo`` (min) and ``hi`` (max),
    None when not given. Built by ``parse``, which checks it."""

    kind: str
    params: dict[str, float]
    lo: float | None = None
    hi: float | None = None

    @classmethod
    def constant(cls, value: float) -> Dist:
        return cls("constant", {"value": float(value)})

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.params.items())), self.lo, self.hi))

    def sample(self, rng: random.Random) -> float:
        """One draw, clamped. A constant draws nothing from ``rng``."""
        p = self.params
        if self.kind == "constant":
            x = p["value"]
        elif self.kind == "uniform":
            x = rng.uniform(p["low"], p["high"])
        elif self.kind == "lognormal":
            x = p["median"] * math.exp(p["sigma"] * rng.normalvariate(0.0, 1.0))
        elif self.kind == "exponential":
            x = rng.expovariate(1.0 / p["mean"])
        elif self.kind == "normal":
            x = rng.normalvariate(p["mean"], p["sd"])
        else:
            raise ValueError(f"unknown distribution {self.kind!r}")
        if self.lo is not None:
            x = max(x, self.lo)
        if self.hi is not None:
            x = min(x, self.hi)
        return x

    @functools.cached_property
    def mean(self) -> float:
        """The mean of the draws: exact without clamps, else the average of
        ``MEAN_DRAWS`` draws from a fixed seed (computed once)."""
        p = self.params
        if self.lo is None and self.hi is None:
            if self.kind == "constant":
                return p["value"]
            if self.kind == "uniform":
                return (p["low"] + p["high"]) / 2
            if self.kind == "lognormal":
                return p["median"] * math.exp(p["sigma"] ** 2 / 2)
            return p["mean"]  # exponential, normal
        rng = random.Random(f"mean/{self.describe()}")
        return math.fsum(self.sample(rng) for _ in range(MEAN_DRAWS)) / MEAN_DRAWS

    def describe(self) -> str:
        """In words: "lognormal(median 8, sigma 0.4) in [2, 40]", "constant 30"."""
        if self.kind == "constant":
            text = f"constant {_g(self.params['value'])}"
        else:
            text = f"{self.kind}({', '.join(f'{k} {_g(v)}' for k, v in self.params.items())})"
        if self.lo is not None and self.hi is not None:
            return f"{text} in [{_g(self.lo)}, {_g(self.hi)}]"
        if self.lo is not None:
            return f"{text} at least {_g(self.lo)}"
        if self.hi is not None:
            return f"{text} at most {_g(self.hi)}"
        return text

    def support(self) -> tuple[float, bool, float]:
        """The values a draw can take, clamps applied: (lowest, whether the
        lowest itself can be drawn, highest)."""
        p = self.params
        if self.kind == "constant":
            lo, closed, hi = p["value"], True, p["value"]
        elif self.kind == "uniform":
            lo, closed, hi = p["low"], True, p["high"]
        elif self.kind in ("lognormal", "exponential"):
            lo, closed, hi = 0.0, False, math.inf
        elif p["sd"] > 0:  # normal
            lo, closed, hi = -math.inf, False, math.inf
        else:
            lo, closed, hi = p["mean"], True, p["mean"]
        if self.lo is not None and self.lo > lo:
            lo, closed, hi = self.lo, True, max(hi, self.lo)
        if self.hi is not None and self.hi < hi:
            hi = self.hi
            if self.hi <= lo:
                lo, closed = self.hi, True
        return lo, closed, hi


# --- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConditions:
    """One simulated device's drawn conditions."""

    group: str
    speed: float  # training time multiplier (> 0; larger is slower), see compute.speed
    uplink_bytes_s: float  # 0: unlimited
    downlink_bytes_s: float  # 0: unlimited
    latency_s: float  # one way, added in each direction
    always_on: bool
    crash_in_training: float  # probability per training run
    drop_in_upload: float  # probability per update


@dataclass(frozen=True)
class Group:
    """One ``[[group]]``, checked. Its distributions are in the file's units:
    ``speed`` is compute.speed, ``uplink`` and ``downlink`` are in kbit/s,
    ``latency`` in ms, ``online``, ``offline`` and ``restart`` in seconds;
    ``online`` and ``offline`` are None when the group is always on."""

    name: str
    share: float
    speed: Dist
    uplink: Dist
    downlink: Dist
    latency: Dist
    online: Dist | None
    offline: Dist | None
    daily_amplitude: float
    peak_hour: float
    always_on: bool
    crash_in_training: float
    drop_in_upload: float
    restart: Dist

    def daily_factor(self, fleet_s: float) -> float:
        """1 + a cos(2 pi (h - peak) / 24) at hour h of fleet time (0 is midnight)."""
        if self.daily_amplitude == 0:
            return 1.0
        hour = (fleet_s / 3600.0) % 24.0
        return 1.0 + self.daily_amplitude * math.cos(2 * math.pi * (hour - self.peak_hour) / 24.0)

    def conditions(self, rng: random.Random) -> DeviceConditions:
        """One device's draws, in this order: speed, uplink, downlink, latency."""
        return DeviceConditions(
            group=self.name,
            speed=self.speed.sample(rng),
            uplink_bytes_s=self.uplink.sample(rng) * 1000 / 8,
            downlink_bytes_s=self.downlink.sample(rng) * 1000 / 8,
            latency_s=self.latency.sample(rng) / 1000,
            always_on=self.always_on,
            crash_in_training=self.crash_in_training,
            drop_in_upload=self.drop_in_upload,
        )

    def to_json(self) -> dict[str, Any]:
        def text(d: Dist | None) -> str | None:
            return None if d is None else d.describe()

        return {
            "name": self.name,
            "share": self.share,
            "compute": {"speed": text(self.speed)},
            "network": {"uplink_kbit_s": text(self.uplink), "downlink_kbit_s": text(self.downlink),
                        "latency_ms": text(self.latency)},
            "availability": {"always_on": self.always_on, "online_s": text(self.online),
                             "offline_s": text(self.offline),
                             "daily_cycle": {"amplitude": self.daily_amplitude, "peak_hour": self.peak_hour}},
            "failures": {"crash_in_training": self.crash_in_training, "drop_in_upload": self.drop_in_upload,
                         "restart_s": text(self.restart)},
        }


def _counts(shares: list[float], n: int) -> list[int]:
    """``n`` split by ``shares`` (largest remainder, exact arithmetic; ties
    go to the earlier group)."""
    total = sum(Fraction(s) for s in shares)
    quotas = [Fraction(s) / total * n for s in shares]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Profile:
    """A checked fleet profile (see the module's documentation)."""

    name: str
    description: str
    groups: tuple[Group, ...]

    def devices(self, n: int, seed: int) -> list[DeviceConditions]:
        """The conditions of devices 0 to n-1: the same for the same
        (n, seed). Each group gets its share of n (largest remainder); a
        shuffle seeded by ``seed`` says which device is in which, and device
        i draws from ``random.Random(f"{seed}/{i}/conditions")``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of devices must be an integer >= 0, got {n!r}")
        counts = _counts([g.share for g in self.groups], n)
        members = [g for g, count in zip(self.groups, counts, strict=True) for _ in range(count)]
        random.Random(f"{seed}/groups").shuffle(members)
        return [g.conditions(random.Random(f"{seed}/{i}/conditions")) for i, g in enumerate(members)]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise ProfileError(f"profile {self.name}: no group {name!r} (groups: {', '.join(g.name for g in self.groups)})")

    def to_json(self) -> dict[str, Any]:
        """Everything, each distribution in words (``Dist.describe``)."""
        return {"name": self.name, "description": self.description, "groups": [g.to_json() for g in self.groups]}


class Availability:
    """One device's online/offline schedule, in fleet seconds.

    The device starts online with probability mean(online) / (mean(online)
    + mean(offline)) unless ``start_online`` says; the first session starts
    at the time of the first call. Sessions alternate; each is drawn when it
    is first asked for (``next_change``) and starts when the previous one
    ended, so the schedule depends on ``rng`` alone, not on when it is
    polled. Its length is scaled by the group's daily cycle at its start.
    ``advance(now_s)`` flips the state once if the change is due; call it at
    (or after) each ``next_change``. A device of a group that is always on
    is online (whatever ``start_online`` says) and never changes.
    """

    def __init__(self, group: Group, rng: random.Random, start_online: bool | None = None) -> None:
        self.group = group
        self._rng = rng
        self._start: float | None = None  # when the current session began; None: at the first call
        self._change: float | None = None  # when it ends; None: not drawn yet
        if group.online is None or group.offline is None:
            self.online = True
            return
        if start_online is None:
            on, off = group.online.mean, group.offline.mean
            start_online = rng.random() < on / (on + off)
        self.online = start_online

    @property
    def always_on(self) -> bool:
        return self.group.online is None or self.group.offline is None

    def next_change(self, now_s: float) -> float | None:
        """The fleet time at which the state flips next; None: never."""
        online_s, offline_s = self.group.online, self.group.offline
        if online_s is None or offline_s is None:
            return None
        if self._change is None:
            start = now_s if self._start is None else self._start
            factor = self.group.daily_factor(start)
            if self.online:
                self._change = start + online_s.sample(self._rng) * factor
            else:
                self._change = start + offline_s.sample(self._rng) / factor
        return self._change

    def advance(self, now_s: float) -> bool:
        """Flip the state if ``now_s`` has reached the change; the state now."""
        change = self.next_change(now_s)
        if change is not None and now_s >= change:
            self.online = not self.online
            self._start, self._change = change, None
        return self.online


# --- reading a profile --------------------------------------------------------------

TOP_KEYS = ("name", "description", "group")
GROUP_KEYS = ("name", "share", "compute", "network", "availability", "failures")
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "compute": ("speed",),
    "network": ("uplink_kbit_s", "downlink_kbit_s", "latency_ms"),
    "availability": ("online_s", "offline_s", "daily_cycle", "always_on"),
    "failures": ("crash_in_training", "drop_in_upload", "restart_s"),
}
CYCLE_KEYS = ("amplitude", "peak_hour")
GROUP_NAME = re.compile(r"[a-z0-9_-]+")
PROBABILITY = Range(0, 1)
HOUR = Range(0, 24, hi_open=True)
DEFAULT_AMPLITUDE, DEFAULT_PEAK_HOUR = 0.5, 20.0


def _shown(value: Any) -> str:
    """A value from the file, on one line and short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _what(value: Any) -> str:
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "number"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, list):
        return "an array"
    else:
        kind = "date/time"
    return f"{kind} {_shown(value)}"


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


class _Where:
    """Where in the profile a value is, for the one error line:
    ``fleet.toml: group "pi-lte": `` and the key path after it."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def fail(self, text: str) -> NoReturn:
        raise ProfileError(f"{self.prefix}{text}")

    def table(self, value: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
        """``value`` as a table holding only ``known`` keys."""
        if not isinstance(value, dict):
            self.fail(f"{path} must be a table, got {_what(value)}")
        for key in value:
            if key not in known:
                self.fail(f"{path + '.' if path else ''}{_key(key)} is not a known key (known: {', '.join(known)})")
        return value

    def number(self, value: Any, path: str, valid: Range) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{path} must be a number, got {_what(value)}")
        try:
            x = float(value)
        except OverflowError:
            self.fail(f"{path} = {_shown(value)} is too large: use {valid.describe()}")
        if not math.isfinite(x):
            self.fail(f"{path} = {x}: use a finite number")
        if not valid.allows(x):
            self.fail(f"{path} = {_g(x)} is out of range: use {valid.describe()}")
        return x

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(f"{path} must be true or false, got {_what(value)}")
        return value

    def dist(self, value: Any, path: str, floor: str = "zero") -> Dist:
        """A distribution whose draws are all >= 0 (``floor`` "zero"), all
        > 0 ("positive"), or >= 0 with some above 0 ("session")."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            valid = POSITIVE if floor != "zero" else NON_NEGATIVE
            return Dist.constant(self.number(value, path, Range(valid.lo, LIMIT, lo_open=valid.lo_open)))
        if not isinstance(value, dict):
            self.fail(f"{path} must be a number or a distribution such as "
                      f'{{ dist = "uniform", low = 1, high = 2 }}, got {_what(value)}')
        kinds = ", ".join(PARAMS)
        if "dist" not in value:
            self.fail(f"{path}: dist is missing (one of {kinds}), or give a bare number")
        kind = value["dist"]
        if not isinstance(kind, str) or kind not in PARAMS:
            self.fail(f"{path}.dist {_shown(kind)} is not known; use one of {kinds}")
        self.table(value, path, ("dist", *PARAMS[kind], "min", "max"))
        params: dict[str, float] = {}
        for name in PARAMS[kind]:
            if name not in value:
                self.fail(f"{path}: {kind} needs {' and '.join(PARAMS[kind])}; {name} is missing")
            params[name] = self.number(value[name], f"{path}.{name}", _PARAM_RANGES.get((kind, name), ANY))
        lo = self.number(value["min"], f"{path}.min", ANY) if "min" in value else None
        hi = self.number(value["max"], f"{path}.max", ANY) if "max" in value else None
        if kind == "uniform" and params["low"] > params["high"]:
            self.fail(f"{path}: low {_g(params['low'])} is above high {_g(params['high'])}")
        if lo is not None and hi is not None and lo > hi:
            self.fail(f"{path}: min {_g(lo)} is above max {_g(hi)}")
        dist = Dist(kind, params, lo, hi)
        self._floor(dist, path, floor)
        return dist

    def _floor(self, dist: Dist, path: str, floor: str) -> None:
        lo, closed, hi = dist.support()
        if floor == "positive" and (lo < 0 or (lo == 0 and closed)):
            if dist.kind == "constant" and dist.lo is None and dist.hi is None:
                self.fail(f"{path} = {_g(lo)} is out of range: use {Range(0, LIMIT, lo_open=True).describe()}")
            drawn = "values below 0" if lo < 0 else "0"
            self.fail(f"{path}: {dist.describe()} can draw {drawn}; it must stay above 0: give a min above 0")
        if hi < 0:
            self.fail(f"{path}: {dist.describe()} is always below 0; it must be 0 or more")
        if lo < 0:
            self.fail(f"{path}: {dist.describe()} can draw values below 0; give a min of 0 or more")
        if floor == "session" and hi <= 0:
            self.fail(f"{path}: {dist.describe()} is always 0; its mean must be above 0")


def _group(raw: Any, index: int, source: str) -> Group:
    where = _Where(f"{source}: group {index}: ")
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: group {index} must be a table ([[group]]), got {_what(raw)}")
    if "name" not in raw:
        where.fail("name is missing")
    name = raw["name"]
    if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
        where.fail(f"name {_shown(name)} must be a string of lowercase letters, digits, _ and -")
    where = _Where(f'{source}: group "{name}": ')
    where.table(raw, "", GROUP_KEYS)
    if "share" not in raw:
        where.fail("share is missing: the fraction of the fleet in this group")
    share = where.number(raw["share"], "share", FRACTION)
    t = {key: where.table(raw.get(key, {}), key, known) for key, known in TABLE_KEYS.items()}
    net, failures = t["network"], t["failures"]
    online, offline, amplitude, peak, always_on = _availability(where, t["availability"])
    return Group(
        name=name,
        share=share,
        speed=where.dist(t["compute"].get("speed", 1.0), "compute.speed", "positive"),
        uplink=where.dist(net.get("uplink_kbit_s", 0.0), "network.uplink_kbit_s"),
        downlink=where.dist(net.get("downlink_kbit_s", 0.0), "network.downlink_kbit_s"),
        latency=where.dist(net.get("latency_ms", 0.0), "network.latency_ms"),
        online=online,
        offline=offline,
        daily_amplitude=amplitude,
        peak_hour=peak,
        always_on=always_on,
        crash_in_training=where.number(failures.get("crash_in_training", 0.0), "failures.crash_in_training",
                                       PROBABILITY),
        drop_in_upload=where.number(failures.get("drop_in_upload", 0.0), "failures.drop_in_upload", PROBABILITY),
        restart=where.dist(failures.get("restart_s", 10.0), "failures.restart_s"),
    )


def _availability(where: _Where, table: dict[str, Any]) -> tuple[Dist | None, Dist | None, float, float, bool]:
    """online_s, offline_s (None when always on), amplitude, peak hour, always_on."""
    amplitude, peak = 0.0, DEFAULT_PEAK_HOUR
    if "daily_cycle" in table:
        cycle = where.table(table["daily_cycle"], "availability.daily_cycle", CYCLE_KEYS)
        amplitude = where.number(cycle.get("amplitude", DEFAULT_AMPLITUDE), "availability.daily_cycle.amplitude",
                                 DECAY)
        peak = where.number(cycle.get("peak_hour", DEFAULT_PEAK_HOUR), "availability.daily_cycle.peak_hour", HOUR)
    forced = where.boolean(table["always_on"], "availability.always_on") if "always_on" in table else None
    online = where.dist(table["online_s"], "availability.online_s", "session") if "online_s" in table else None
    offline = where.dist(table["offline_s"], "availability.offline_s", "session") if "offline_s" in table else None
    if forced:
        return None, None, amplitude, peak, True
    if online is None and offline is None:
        if forced is False:
            where.fail("availability.always_on = false needs online_s and offline_s")
        return None, None, amplitude, peak, True
    if online is None or offline is None:
        missing, given = ("online_s", "offline_s") if online is None else ("offline_s", "online_s")
        where.fail(f"availability.{missing} is missing: give it with {given} (or neither, for always online)")
    return online, offline, amplitude, peak, False


def parse(data: dict[str, Any], source: str) -> Profile:
    """A checked ``Profile`` from a TOML document's tables; ``source`` (a
    file name, "preset lab") begins every error line, and its stem is the
    profile's name when the file gives none."""
    where = _Where(f"{source}: ")
    if not isinstance(data, dict):
        where.fail(f"a profile must be a table of keys, got {_what(data)}")
    where.table(data, "", TOP_KEYS)
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        where.fail(f"name must be a non-empty string, got {_what(name)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        where.fail(f"description must be a string, got {_what(description)}")
    raw = data.get("group", [])
    if not isinstance(raw, list):
        where.fail(f"group must be an array of tables (write [[group]]), got {_what(raw)}")
    if not raw:
        where.fail("no [[group]]: a profile needs at least one group")
    groups = tuple(_group(g, i, source) for i, g in enumerate(raw, 1))
    seen: dict[str, int] = {}
    for i, g in enumerate(groups, 1):
        if g.name in seen:
            where.fail(f'group "{g.name}" is both group {seen[g.name]} and group {i}: group names must be unique')
        seen[g.name] = i
    total = math.fsum(g.share for g in groups)
    if abs(total - 1) > 1e-6:
        each = ", ".join(f"{g.name} {_g(g.share)}" for g in groups)
        where.fail(f"the groups' share values add up to {total:.6g} ({each}); they must add up to 1")
    return Profile(name=name, description=description, groups=groups)


def load(path_or_name: str) -> Profile:
    """A preset by its name (``PRESETS``), else the profile file at that path."""
    if path_or_name in PRESETS:
        return parse(tomllib.loads(PRESETS[path_or_name]), f"preset {path_or_name}")
    path = Path(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"fleet profile {str(path)!r} is neither a file nor a preset "
                           f"({', '.join(preset_names())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot be read: {one_line(exc)}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {one_line(exc)}") from None
    return parse(data, str(path))


def preset_names() -> list[str]:
    """The presets, from the most even fleet to the most unequal."""
    return list(PRESETS)


# --- presets ------------------------------------------------------------------------
#
# Assumptions, not measurements: plausible numbers for the devices and links
# named, to be replaced by a fleet's own measurements when there are some.
# The issue that asked for profiles (29) puts the fleet at "Raspberry Pis next
# to Jetsons (training speed differs 5-10x), on home Wi-Fi, LTE or NB-IoT
# (uplinks from about 0.1 to 10 Mbit/s, latencies of 50-500 ms)".
# compute.speed is relative to the simulating host (a desktop or server
# x86-64 core): how many times longer the device takes for the same run.

_LAB = """\
# Today's lab: every device as fast as the host, unlimited network without
# delay, always online, never failing. Every key is left at its default.
name = "lab"
description = "identical devices: speed 1, unlimited network, always online, no failures"

[[group]]
name = "lab"
share = 1.0
"""

_HOME_WIFI = """\
# Devices at home, on Wi-Fi behind a consumer broadband line.
name = "home-wifi"
description = "Raspberry Pi 4s and a minority of Jetsons on home Wi-Fi, online for hours"

[[group]]
name = "pi4"
share = 0.8
# A Raspberry Pi 4 (4x Cortex-A72, 1.5 GHz) trains a small model on the CPU
# about 5-10x slower than a desktop core (assumed median 7.5); the spread
# covers Pi 4s, Pi 400s and throttling in warm cases.
compute.speed = { dist = "lognormal", median = 7.5, sigma = 0.3, min = 4.0, max = 15.0 }
# Consumer broadband uplinks are mostly 2-20 Mbit/s, downlinks 10-100 Mbit/s;
# Wi-Fi plus access network adds 5-40 ms one way.
network.uplink_kbit_s = { dist = "uniform", low = 2000, high = 20000 }
network.downlink_kbit_s = { dist = "uniform", low = 10000, high = 100000 }
network.latency_ms = { dist = "lognormal", median = 15, sigma = 0.5, min = 5, max = 40 }
# Mostly on: sessions of hours (mean 4 h), gaps of tens of minutes (mean 20
# min: a router restart, a power cut, someone unplugging the device).
availability.online_s = { dist = "exponential", mean = 14400, min = 600 }
availability.offline_s = { dist = "exponential", mean = 1200, min = 60 }
# Rare failures: an SD card or power hiccup during training, a Wi-Fi drop
# during an upload; a Pi reboots in about half a minute.
failures.crash_in_training = 0.005
failures.drop_in_upload = 0.005
failures.restart_s = { dist = "uniform", low = 20, high = 60 }

[[group]]
name = "jetson"
share = 0.2
# A Jetson (Orin Nano class) on its GPU: close to the host (assumed median
# 1.5, five times faster than the Pis).
compute.speed = { dist = "lognormal", median = 1.5, sigma = 0.2, min = 1.0, max = 3.0 }
network.uplink_kbit_s = { dist = "uniform", low = 2000, high = 20000 }
network.downlink_kbit_s = { dist = "uniform", low = 10000, high = 100000 }
network.latency_ms = { dist = "lognormal", median = 15, sigma = 0.5, min = 5, max = 40 }
availability.online_s = { dist = "exponential", mean = 14400, min = 600 }
availability.offline_s = { dist = "exponential", mean = 1200, min = 60 }
failures.crash_in_training = 0.005
failures.drop_in_upload = 0.005
# JetPack boots more slowly than Raspberry Pi OS.
failures.restart_s = { dist = "uniform", low = 40, high = 90 }
"""

_CELLULAR_MIXED = """\
# The most unequal fleet: devices in the field on cellular links. Compute
# differs about 8x between the fastest group and the slowest, uplinks 100x
# (0.1-10 Mbit/s), latencies 50-500 ms; devices are online for minutes to an
# hour, and longer around the evening peak (a daily cycle: more power and
# better coverage then, assumed).
name = "cellular-mixed"
description = "Jetsons and Pis on LTE, Pis on NB-IoT or weak LTE; intermittent, with a daily cycle"

[[group]]
name = "jetson-lte"
share = 0.2
# Jetson (Orin Nano class) on its GPU: about as fast as the host.
compute.speed = { dist = "lognormal", median = 1.2, sigma = 0.2, min = 0.8, max = 2.0 }
# LTE (Cat 4 and better) with a good signal: 2-10 Mbit/s up, 5-40 Mbit/s
# down, 50-150 ms one way.
network.uplink_kbit_s = { dist = "uniform", low = 2000, high = 10000 }
network.downlink_kbit_s = { dist = "uniform", low = 5000, high = 40000 }
network.latency_ms = { dist = "uniform", low = 50, high = 150 }
# Vehicle- or mains-powered: the longest sessions of the three groups.
availability.online_s = { dist = "exponential", mean = 3600, min = 120 }
availability.offline_s = { dist = "exponential", mean = 600, min = 30 }
availability.daily_cycle = { amplitude = 0.5, peak_hour = 20.0 }
failures.crash_in_training = 0.01
failures.drop_in_upload = 0.01
failures.restart_s = { dist = "uniform", low = 40, high = 120 }

[[group]]
name = "pi-lte"
share = 0.5
# Raspberry Pi 4 on the CPU (see home-wifi), somewhat slower in enclosures
# that get warm.
compute.speed = { dist = "lognormal", median = 8.0, sigma = 0.3, min = 5.0, max = 16.0 }
# LTE Cat 1 / Cat 4 modems on ordinary signal: 0.5-5 Mbit/s up, 2-20 Mbit/s
# down, 80-300 ms.
network.uplink_kbit_s = { dist = "uniform", low = 500, high = 5000 }
network.downlink_kbit_s = { dist = "uniform", low = 2000, high = 20000 }
network.latency_ms = { dist = "uniform", low = 80, high = 300 }
availability.online_s = { dist = "exponential", mean = 1800, min = 60 }
availability.offline_s = { dist = "exponential", mean = 600, min = 30 }
availability.daily_cycle = { amplitude = 0.5, peak_hour = 20.0 }
failures.crash_in_training = 0.02
failures.drop_in_upload = 0.03
# A reboot and the modem's network attach.
failures.restart_s = { dist = "uniform", low = 30, high = 120 }

[[group]]
name = "pi-nbiot"
share = 0.3
# Older or smaller Pis (Pi 3, Zero 2 W class) on battery: about 10x the
# host's training time.
compute.speed = { dist = "lognormal", median = 10.0, sigma = 0.3, min = 6.0, max = 20.0 }
# NB-IoT (Cat NB2) or LTE at the cell edge: 0.1-0.25 Mbit/s up, 0.2-1 Mbit/s
# down, 200-500 ms.
network.uplink_kbit_s = { dist = "uniform", low = 100, high = 250 }
network.downlink_kbit_s = { dist = "uniform", low = 200, high = 1000 }
network.latency_ms = { dist = "uniform", low = 200, high = 500 }
# Duty-cycled to save power: short sessions, long gaps.
availability.online_s = { dist = "exponential", mean = 900, min = 60 }
availability.offline_s = { dist = "exponential", mean = 1200, min = 60 }
availability.daily_cycle = { amplitude = 0.5, peak_hour = 20.0 }
failures.crash_in_training = 0.03
failures.drop_in_upload = 0.05
# A slow reboot and a slow attach to the network.
failures.restart_s = { dist = "uniform", low = 60, high = 300 }
"""

PRESETS: dict[str, str] = {
    "lab": _LAB,
    "home-wifi": _HOME_WIFI,
    "cellular-mixed": _CELLULAR_MIXED,
}
