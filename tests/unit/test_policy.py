"""Policies built from the config: each field takes a config key that exists,
and its default is that key's (one source)."""

import dataclasses

import pytest

from aggregator.config import (
    AggregatorConfig,
    ServerSection,
    check_configured,
    configured,
    configured_keys,
    section_class,
)
from aggregator.policy import RoundPolicy, check_sources
from aggregator.robust import Defences
from fedge.config import updated

# Every key a policy takes, at a valid value other than its default.
CHANGED = {
    "job": {"rounds": 7, "seed": 3},
    "selection": {"fraction": 0.5, "min_clients": 3, "max_clients": 8, "quorum": 0.75, "min_updates": 2,
                  "deadline_s": 30.0, "settle_s": 0.5, "offline_grace_s": 1.5, "list_max": 3},
    "server": {"max_samples_per_update": 5000, "aggregation": "trimmed_mean", "clip": "fixed", "clip_norm": 2.5,
               "clip_multiplier": 1.5, "weight_cap": 3.0, "trim_fraction": 0.2, "krum_f": 2, "krum_m": 3,
               "direction": "off", "direction_beta": 0.5, "direction_tau": -0.25},
    "limits": {"max_update_bytes": 1 << 20, "aggregation_bytes": 1 << 25, "max_devices": 500},
}
# The built sub-policies on: central privacy and secure aggregation.
PRIVATE = {"selection": {"min_clients": 4}, "privacy": {"mode": "central", "clip_quantile": 0.5, "sampling_rate": 0.25},
           "secagg": {"mode": "on", "threshold": 3}}


def changed_config():
    cfg = updated(AggregatorConfig(), **CHANGED)
    cfg.check()
    return cfg


def test_every_policy_field_takes_a_config_key_that_exists_or_is_built():
    check_sources()
    check_configured(Defences)
    assert {section for section, _ in configured_keys(Defences).values()} == {"server"}


def test_a_field_without_a_source_or_with_an_unknown_key_fails_the_check():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Loose:
        rounds: int = configured("job", "rounds")
        stray: int = 1

    with pytest.raises(LookupError, match="stray neither configured nor built"):
        check_configured(Loose)
    check_configured(Loose, built=["stray"])
    with pytest.raises(LookupError, match="rounds built but configured too"):
        check_configured(Loose, built=["stray", "rounds"])

    @dataclasses.dataclass(frozen=True)
    class Renamed:  # a key renamed after the policy was written: its default cannot be read
        x: int = dataclasses.field(default=0, metadata={"config": ("selection", "min_client")})

    with pytest.raises(LookupError, match=r"Renamed\.x: .*selection\.min_client"):
        check_configured(Renamed)
    with pytest.raises(KeyError, match=r"selection\.min_client"):
        configured("selection", "min_client")
    with pytest.raises(KeyError, match=r"\[selecton\]"):
        configured("selecton", "min_clients", required=True)


def test_the_changed_config_changes_every_key_a_policy_takes():
    taken = set(configured_keys(RoundPolicy).values()) | set(configured_keys(Defences).values())
    assert {(s, k) for s, keys in CHANGED.items() for k in keys} == taken
    for section, keys in CHANGED.items():
        default = section_class(section)()
        for key, value in keys.items():
            assert getattr(default, key) != value, f"{section}.{key}"


def test_defences_defaults_are_the_server_sections():
    assert Defences() == Defences.from_config(ServerSection())
    changed = updated(AggregatorConfig(), **CHANGED).server
    d = Defences.from_config(changed)
    assert d.rule == "trimmed_mean" and d.clip == "fixed" and d.direction_tau == -0.25
    assert d == Defences(**{name: getattr(changed, key) for name, (_, key) in configured_keys(Defences).items()})
    with pytest.raises(TypeError):
        Defences("median")  # keyword-only


def test_round_policy_defaults_are_the_configs():
    built = RoundPolicy.from_config(AggregatorConfig())
    required = {f.name: getattr(built, f.name) for f in dataclasses.fields(RoundPolicy)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert set(required) == {"rounds", "fraction", "min_clients", "max_clients", "quorum", "min_updates",
                             "deadline_s", "settle_s", "max_samples", "max_update_bytes", "seed"}
    assert RoundPolicy(**required) == built
    with pytest.raises(TypeError):
        RoundPolicy(30, 1.0)  # keyword-only


def test_round_policy_takes_each_key_and_builds_its_sub_policies():
    p = RoundPolicy.from_config(changed_config())
    assert (p.rounds, p.seed, p.min_clients, p.max_samples, p.max_update_bytes, p.offline_grace_s) == (
        7, 3, 3, 5000, 1 << 20, 1.5)
    assert p.defences == Defences.from_config(changed_config().server)
    assert p.privacy is None and p.secagg is None
    private = updated(AggregatorConfig(), **PRIVATE)
    private.check()
    q = RoundPolicy.from_config(private)
    assert q.privacy is not None and q.privacy.min_devices == 4 and q.privacy.clip_quantile == 0.5
    assert q.secagg is not None and q.secagg.threshold == 3
    # tests/unit/builders.py builds its round cores this way
    assert dataclasses.replace(q, rounds=5, settle_s=0.0).rounds == 5


def test_secure_aggregation_defaults_are_the_secagg_sections():
    from aggregator.config import SecAggSection
    from aggregator.secure import SecAggPolicy

    assert SecAggPolicy.from_config(SecAggSection()) is None  # off by default
    on = SecAggPolicy.from_config(dataclasses.replace(SecAggSection(), mode="on"))
    assert on == SecAggPolicy()
