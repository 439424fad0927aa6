"""The numbers a round runs by (``RoundPolicy``), built from the job's config.

Each field names the config key it takes (``aggregator.config.configured``);
a field with a default has that key's default. ``defences``, ``privacy`` and
``secagg`` are built from their sections, and default to what the default
config builds. ``check_sources`` fails on a field that is neither or on a key
the config lacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aggregator.config import AggregatorConfig, check_configured, configured, configured_keys
from aggregator.privacy import DpPolicy
from aggregator.robust import Defences
from aggregator.secure import SecAggPolicy
from aggregator.staleness import BufferedPolicy


def built(build: Callable[[AggregatorConfig], Any]) -> Any:
    """A sub-policy that ``from_config`` makes with ``build``; its default is
    what ``build`` makes of the default config."""
    return field(default=build(AggregatorConfig()), metadata={"build": build})


@dataclass(frozen=True, kw_only=True)
class RoundPolicy:
    """The numbers a round runs by; ``from_config`` builds it from the job's
    config, the one source of their defaults."""

    rounds: int = configured("job", "rounds", required=True)
    fraction: float = configured("selection", "fraction", required=True)
    min_clients: int = configured("selection", "min_clients", required=True)
    max_clients: int = configured("selection", "max_clients", required=True)
    quorum: float = configured("selection", "quorum", required=True)
    min_updates: int = configured("selection", "min_updates", required=True)
    deadline_s: float = configured("selection", "deadline_s", required=True)
    settle_s: float = configured("selection", "settle_s", required=True)
    max_samples: int = configured("server", "max_samples_per_update", required=True)
    max_update_bytes: int = configured("limits", "max_update_bytes", required=True)
    seed: int = configured("job", "seed", required=True)
    defences: Defences = built(lambda cfg: Defences.from_config(cfg.server))
    aggregation_bytes: int = configured("limits", "aggregation_bytes")
    max_devices: int = configured("limits", "max_devices")
    offline_grace_s: float = configured("selection", "offline_grace_s")
    list_max: int = configured("selection", "list_max")
    privacy: DpPolicy | None = built(lambda cfg: DpPolicy.from_config(cfg.privacy, cfg.dp_devices()))
    secagg: SecAggPolicy | None = built(lambda cfg: SecAggPolicy.from_config(cfg.secagg))
    buffered: BufferedPolicy | None = built(BufferedPolicy.from_config)  # None: synchronous rounds
    # A relayed job: "root" (its rounds are answered by relays' region sums), "relay" (set by the relay
    # for its region's rounds: aggregator.relay), or "" (devices talk to this aggregator).
    tree: str = built(lambda cfg: "root" if cfg.relays.min_relays else "")

    @classmethod
    def from_config(cls, cfg: AggregatorConfig) -> RoundPolicy:
        values = {name: getattr(getattr(cfg, section), key) for name, (section, key) in configured_keys(cls).items()}
        values.update({name: build(cfg) for name, build in _builders(cls).items()})
        if cfg.relays.min_relays:
            # A relayed job's root: its members are its relays; it asks every one online (once min_relays
            # are) and waits for them all, or its deadline. selection.* is the regions' (fedge relay).
            values.update(fraction=1.0, min_clients=cfg.relays.min_relays, max_clients=0, quorum=1.0,
                          min_updates=1)
        return cls(**values)


def _builders(policy: type) -> dict[str, Callable[[AggregatorConfig], Any]]:
    return {f.name: f.metadata["build"] for f in dataclasses.fields(policy) if "build" in f.metadata}


def check_sources() -> None:
    """Raises ``LookupError`` unless every ``RoundPolicy`` field takes a config
    key that exists or is built from the config."""
    check_configured(RoundPolicy, built=_builders(RoundPolicy))
