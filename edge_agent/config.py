"""The edge agent's configuration: its sections, their defaults and their
checks.

``AgentConfig.check`` runs whenever a config is loaded and whenever an
agent runtime is built from it, so every caller gets the same one-line
``ConfigError``. Configs are immutable: build a changed copy with
``fedge.config.updated`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass

from edge_agent.metrics import AgentMetricsSettings
from fedge.config import (
    NON_NEGATIVE,
    POSITIVE,
    BrokerSettings,
    ConfigError,
    Range,
    at_least,
    check_ranges,
    section,
    setting,
)

ROLES = ("trainer", "inference")
DOWNLINKS = ("on_demand", "follow")


def check_choice(value: str, choices: tuple[str, ...], key: str) -> str:
    """``value`` if it is one of ``choices``, else the one-line ``ConfigError``."""
    if value not in choices:
        raise ConfigError(f"{key} {value!r} is not known; use {' or '.join(choices)}")
    return value


@dataclass(frozen=True)
class AgentSection:
    id: str = setting("", "Device id, its own topic level; empty: the host name.")
    role: str = setting("trainer", "trainer (trains rounds) or inference (serves the published ONNX model only).")
    job: str = setting("default", "Job to take part in.")
    region: str = setting(
        "", "A relayed job's region: the device talks to that region's relay (fedge relay --region), on "
        "fedge/v1/<job>/region/<region>/, and takes the model from the root; empty: the job has no relays.")
    state_dir: str = setting("fedge-agent-state", "Where the agent keeps its state between restarts.")
    model: str = setting(
        "", "Model factory this device accepts; empty: only the built-in fedge.models factories."
    )
    max_model_bytes: int = setting(256 << 20, "Largest global model the agent will download, in bytes.", at_least(1))
    downlink: str = setting(
        "on_demand", "on_demand: fetch the model only when selected (fewest bytes); follow: keep every model."
    )
    resend_after_s: float = setting(20.0, "Resend an update not acknowledged after this long (doubling).", POSITIVE)
    receipts_qos: int = setting(
        1, "QoS of the device's subscription to its receipts and invitations (its one QoS 1 subscription; "
        "retained state is QoS 0). 0 on a broker where a QoS 1 subscription is costly (NATS's MQTT gateway makes "
        "each a JetStream consumer): a receipt missed while away is made up by sending the update again "
        "(agent.resend_after_s), an invitation by the aggregator's when the device is back.", Range(0, 1))
    model_wait_s: float = setting(
        30.0, "Selected but lacking the announced model, with no model bytes arriving for this long (up to a "
        "quarter more, by device, so that a fleet does not fetch in step): fetch the key and delta again, and "
        "again after twice that; after two such fetches, decline the round (model_unavailable), which makes "
        "the aggregator publish them again. Above the time one chunk (broker.max_packet_bytes) takes on the "
        "device's link.", POSITIVE
    )


@dataclass(frozen=True)
class DataSection:
    factory: str = setting(
        "fedge.datasets:digits", "Local data as module:callable returning (x, y) arrays or a torch Dataset."
    )
    args: dict = setting({}, "Keyword arguments for the data callable.")


@dataclass(frozen=True)
class WorkerSection:
    mode: str = setting(
        "per_round", "Training worker: per_round (no PyTorch in memory while idle) or warm (kept between rounds)."
    )
    threads: int = setting(0, "PyTorch threads in the worker; 0: all cores.", NON_NEGATIVE)
    python: str = setting(
        "", "Python interpreter that runs training (one with PyTorch, e.g. JetPack's); empty: the agent's own."
    )
    timeout_s: float = setting(3600.0, "A training run longer than this is killed and declined.", POSITIVE)


@dataclass(frozen=True)
class InferenceSection:
    artifact: str = setting("model", "Name of the published ONNX artifact to download and serve.")
    serve: str = setting("", "host:port for a local HTTP prediction API (POST /predict); empty: none.")
    threads: int = setting(0, "ONNX Runtime threads; 0: all cores.", NON_NEGATIVE)


@dataclass(frozen=True)
class IdentitySection:
    signing: str = setting(
        "required", "required: sign all this device publishes and act only on what the aggregator signed; off: "
        "believe anyone who can publish on the broker."
    )
    key_file: str = setting(
        "", "This device's private key; empty: device.key in the state directory, made at the first start "
        "(its public key is logged: enroll it with `fedge enroll`)."
    )
    aggregator_key: str = setting(
        "", "The aggregator's public key (ed25519:..., logged when it starts), pinned at install time."
    )
    root_key: str = setting(
        "", "A relayed job (agent.region set): the root aggregator's public key, which signs the model; "
        "aggregator_key is then the region's relay's, which signs the announcements and receipts. Empty: "
        "aggregator_key signs both."
    )

    def check(self) -> None:
        from fedge.identity import SIGNING_MODES, IdentityError, read_public_key

        check_choice(self.signing, SIGNING_MODES, "identity.signing")
        if self.signing == "required":
            if not self.aggregator_key:
                raise ConfigError("identity.aggregator_key is empty: copy the key the aggregator logs at its start "
                                  "(or `fedge keys show --key <its state_dir>/aggregator.key`)")
            for name in ("aggregator_key", "root_key"):
                try:
                    if name == "aggregator_key" or self.root_key:
                        read_public_key(getattr(self, name))
                except IdentityError as exc:
                    raise ConfigError(f"identity.{name}: {exc}") from None


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = section(AgentSection, "This device.")
    data: DataSection = section(DataSection, "The device's local data; it never leaves the device.")
    worker: WorkerSection = section(WorkerSection, "The process that runs training.")
    inference: InferenceSection = section(InferenceSection, "Inference-only devices (agent.role = inference).")
    metrics: AgentMetricsSettings = section(AgentMetricsSettings, "Prometheus metrics over HTTP (off by default).")
    broker: BrokerSettings = section(BrokerSettings, "How to reach the MQTT broker.")
    identity: IdentitySection = section(IdentitySection, "This device's key, and the aggregator's it believes.")

    def client_id(self) -> str:
        return self.agent.id or socket.gethostname().split(".")[0]

    def check(self) -> None:
        """Every value the agent will use, checked now: one ``ConfigError`` line."""
        from fedge.topics import check_id

        check_ranges(self)  # every number within its setting's range, before anything uses one
        self.broker.check()
        try:
            check_id(self.client_id(), "agent.id")
            check_id(self.agent.job, "agent.job")
            if self.agent.role == "inference":
                check_id(self.inference.artifact, "inference.artifact")
            if self.agent.region:
                check_id(self.agent.region, "agent.region")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        check_choice(self.agent.role, ROLES, "agent.role")
        self.identity.check()
        if self.agent.region and self.identity.signing == "required" and not self.identity.root_key:
            raise ConfigError("agent.region is set but identity.root_key is empty: a relayed job's model is signed "
                              "by the root; copy the key the root logs at its start (identity.aggregator_key is "
                              "the region's relay's)")
        self.metrics.check()
        check_choice(self.agent.downlink, DOWNLINKS, "agent.downlink")
        if self.worker.python and not shutil.which(self.worker.python):
            raise ConfigError(f"worker.python {self.worker.python!r} is not an executable; give the full path")
        if self.inference.serve:
            host, _, port = self.inference.serve.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"inference.serve {self.inference.serve!r} must be host:port, e.g. "
                                  "127.0.0.1:8080 (empty: no prediction API)")
        if self.agent.role == "trainer":
            self._check_code()

    def _check_code(self) -> None:
        """The data factory (and the model the device accepts) resolve where
        the training worker will import them, found without importing them:
        the agent itself never loads PyTorch while idle."""
        from fedge.imports import ImportSpecError, find_callable, find_callable_in

        for key, spec in (("data.factory", self.data.factory), ("agent.model", self.agent.model)):
            if key == "agent.model" and not spec:  # empty: the built-in models only
                continue
            try:
                if self.worker.python:
                    find_callable_in(self.worker.python, spec, key)
                else:
                    find_callable(spec, key)
            except ImportSpecError as exc:
                raise ConfigError(str(exc)) from None
