"""The configuration machinery (TOML) the roles build their configs with, and
the broker settings every role shares.

Each role owns its sections, their defaults and their checks
(``aggregator.config``, ``edge_agent.config``); this module owns how a file
becomes such a config. A config is a tree of small frozen dataclasses; each
field is declared with ``setting(default, doc)`` so that ``render_defaults``
can print a complete, commented file (``fedge config aggregator``) and the
documentation's configuration reference (docs/reference/config.md) can
quote it. ``updated`` builds a changed copy. A number's setting
also names the values it allows (``valid=POSITIVE``, a ``Range``), which
``check_ranges`` enforces for a whole config: one line naming the key, the
value and the range.

Loading rejects unknown keys with a suggestion (``did you mean ...``) and
wrong types with the key's path, because a silently ignored typo in a fleet
config costs a day.

Secrets never come from the command line or the file itself: the broker
password is read from the environment variable or the file the config names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedge.chunks import CHUNK_HEADER, MIN_CHUNK_DATA, PACKET_OVERHEAD
from fedge.errors import OneReasonError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (a Jetson's JetPack 6): the same parser, from PyPI
    import tomli as tomllib

T = TypeVar("T")
# The smallest MQTT packet a chunk of MIN_CHUNK_DATA bytes fits in (fedge.chunks).
MIN_PACKET_BYTES = MIN_CHUNK_DATA + PACKET_OVERHEAD + CHUNK_HEADER.size


class ConfigError(OneReasonError):
    """One line that names the key, the problem and the fix."""

    default_reason = "config"


@dataclass(frozen=True)
class Range:
    """The values a number setting allows: ``lo`` to ``hi`` (None: no bound),
    each end included unless ``lo_open``/``hi_open``; with ``zero``, 0 is
    allowed too and means that ("no cap"). Never NaN or infinite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    zero: str = ""

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.zero and value == 0:
            return True
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self, integer: bool = False) -> str:
        """The range in words: "a number > 0", "an integer in [2, 24]"."""
        kind = "an integer" if integer else "a number"
        if self.lo is not None and self.hi is not None:
            text = f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = f"a finite {'integer' if integer else 'number'}"
        return f"0 ({self.zero}) or {text}" if self.zero else text


POSITIVE = Range(0, lo_open=True)  # durations, rates, sizes that must be some
NON_NEGATIVE = Range(0)  # counts and weights where 0 means none
FRACTION = Range(0, 1, lo_open=True)  # (0, 1]: a share of something
DECAY = Range(0, 1, hi_open=True)  # [0, 1): momenta, decays, quantiles


def at_least(n: float, zero: str = "") -> Range:
    return Range(n, zero=zero)


def setting(default: Any, doc: str, valid: Range | None = None) -> Any:
    """A config key: its default, its one-line meaning and, for a number,
    the values it allows (checked by ``check_ranges``)."""
    meta: dict[str, Any] = {"doc": doc}
    if valid is not None:
        meta["valid"] = valid
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc, "section": True})


# --- shared ------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    url: str = setting("mqtt://127.0.0.1:1883", "Broker address: mqtt://host:port, or mqtts://host:port for TLS.")
    failover_urls: list = setting(
        [], "More nodes of a clustered broker (NATS, EMQX, ...), as url: when the node connected to cannot be "
        "reached, the next is tried, in turn, and back to url after the last.")
    protocol: str = setting("3.1.1", "MQTT protocol version: \"3.1.1\" or \"5\".")
    username: str = setting("", "User name for the broker; empty for none.")
    password_env: str = setting(
        "FEDGE_BROKER_PASSWORD", "Environment variable that holds the broker password (never put it in this file)."
    )
    password_file: str = setting("", "File whose first line is the broker password; read when the variable is unset.")
    ca_file: str = setting("", "CA bundle to verify the broker's certificate (mqtts); empty: system CAs.")
    cert_file: str = setting("", "Client certificate for mutual TLS; empty for none.")
    key_file: str = setting("", "Private key of the client certificate.")
    tls_insecure: bool = setting(False, "Skip the certificate host name check (test setups only).")
    keepalive_s: int = setting(30, "MQTT keep-alive interval; the broker declares us gone after 1.5x this.",
                               Range(1, 65535))
    max_packet_bytes: int = setting(
        262144, "Largest MQTT packet we send; payloads are chunked below it (AWS IoT Core: 131072).",
        at_least(MIN_PACKET_BYTES),
    )
    reconnect_min_s: float = setting(1.0, "First reconnect delay; doubles up to reconnect_max_s.", POSITIVE)
    reconnect_max_s: float = setting(60.0, "Longest reconnect delay.", POSITIVE)
    session_expiry_s: int = setting(
        86400, "How long the broker keeps our session (subscriptions, queued QoS 1 messages) while we are offline.",
        Range(0, 2**32 - 1),
    )
    max_queued_messages: int = setting(2000, "Outgoing QoS 1 messages kept while disconnected; 0 means no limit.",
                                       NON_NEGATIVE)

    def check(self) -> None:
        """The values; whether the password file can be read is asked by
        ``password()``, on the machine that connects."""
        from fedge.mqtt import parse_url

        tls = parse_url(self.url)[2]
        for url in self.failover_urls:
            try:
                same = isinstance(url, str) and parse_url(url)[2] == tls
            except ConfigError:
                same = False
            if not same:
                raise ConfigError(f"broker.failover_urls: {url!r} must be a broker address like broker.url, with "
                                  "the same scheme (mqtt:// or mqtts://)")
        if self.protocol not in ("3.1.1", "311", "5"):
            raise ConfigError(f"broker.protocol {self.protocol!r} is not supported; use \"3.1.1\" or \"5\"")
        check_ranges(self, "broker.")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(f"broker.reconnect_max_s = {self.reconnect_max_s:g} is below broker.reconnect_min_s = "
                              f"{self.reconnect_min_s:g}: the delay doubles from the one up to the other")

    def password(self) -> str | None:
        if self.password_env and os.environ.get(self.password_env):
            return os.environ[self.password_env]
        if self.password_file:
            try:
                return Path(self.password_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"broker.password_file {self.password_file!r} cannot be read: {exc}") from None
        return None


# --- loading -------------------------------------------------------------------


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, want: Any, path: str) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{path} must be {_type_name(want)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown key {path!r}{hint}")
        want = hints[key]
        if fields[key].metadata.get("section"):
            if not isinstance(value, dict):
                raise ConfigError(f"[{path}] must be a table")
            kwargs[key] = from_dict(want, value, f"{path}.")
        else:
            want = {dict: dict, list: list}.get(typing.get_origin(want) or want, want)
            kwargs[key] = _coerce(value, want, path)
    return cls(**kwargs)


def check_ranges(cfg: Any, where: str = "") -> None:
    """Every number in ``cfg`` (a config or one of its sections, whose keys
    are named from ``where``) finite and within its setting's ``valid``
    range: else one ``ConfigError`` naming the key, the value and the range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{where}{f.name}"
        if f.metadata.get("section"):
            check_ranges(value, f"{path}.")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        valid = f.metadata.get("valid") or Range()
        if not valid.allows(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ConfigError(f"{path} = {shown} is out of range: use {valid.describe(isinstance(value, int))}")


def load(path: str | Path | None, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read a TOML file (or none: all defaults), apply ``section.key=value``
    overrides (values in TOML syntax, strings may be bare), build ``cls`` and
    run its ``check()``. A role's config class may also have a classmethod
    ``prepare(data)`` that adjusts the raw tables before they are built."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} does not exist; create it (see `fedge config --help`)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: write it as section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    prepare = getattr(cls, "prepare", None)
    if prepare is not None:  # a role's own reading of its file (see AggregatorConfig.prepare)
        prepare(data)
    where = f"{path}: " if path else ""
    try:
        cfg = from_dict(cls, data)
        check = getattr(cfg, "check", None)
        if check is not None:
            check()
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_defaults(cls: type, instance: Any = None) -> str:
    """A complete TOML file with every key, its value and its meaning."""
    instance = instance if instance is not None else cls()
    out: list[str] = []
    for name, f in _fields(cls).items():
        sub = getattr(instance, name)
        out.append(f"# {f.metadata['doc']}")
        out.append(f"[{name}]")
        for key, sf in _fields(type(sub)).items():
            value = getattr(sub, key)
            valid = sf.metadata.get("valid")
            allowed = f" Allowed: {valid.describe(isinstance(value, int))}." if valid is not None else ""
            out.append(f"# {sf.metadata['doc']}{allowed}")
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def to_dict(instance: Any) -> dict[str, Any]:
    return dataclasses.asdict(instance)


def updated(cfg: T, **changes: Any) -> T:
    """A copy of the immutable ``cfg`` with some sections changed: each keyword
    names a section and gives either a dict of its keys to change or a whole
    new section, e.g. ``updated(cfg, job={"rounds": 5}, broker=settings)``."""
    kwargs = {}
    for name, change in changes.items():
        current = getattr(cfg, name)
        kwargs[name] = dataclasses.replace(current, **change) if isinstance(change, dict) else change
    return dataclasses.replace(cfg, **kwargs)  # type: ignore[type-var]
