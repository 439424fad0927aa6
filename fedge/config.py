"""Configuration files (TOML) for the roles, with a documented default for every key.

A config is a tree of small dataclasses; each field is declared with
``setting(default, doc)`` so that ``render_defaults`` can print a complete,
commented file (``fedge config aggregator``) and the README can quote it.
Loading rejects unknown keys with a suggestion (``did you mean ...``) and
wrong types with the key's path, because a silently ignored typo in a fleet
config costs a day.

Secrets never come from the command line or the file itself: the broker
password is read from the environment variable or the file the config names.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedge.errors import OneReasonError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 devices
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(OneReasonError):
    """One line that names the key, the problem and the fix."""

    default_reason = "config"


def setting(default: Any, doc: str) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc, "section": True})


# --- shared ------------------------------------------------------------------


@dataclass
class BrokerSettings:
    url: str = setting("mqtt://127.0.0.1:1883", "Broker address: mqtt://host:port, or mqtts://host:port for TLS.")
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
    keepalive_s: int = setting(30, "MQTT keep-alive interval; the broker declares us gone after 1.5x this.")
    max_packet_bytes: int = setting(
        262144, "Largest MQTT packet we send; payloads are chunked below it (AWS IoT Core: 131072)."
    )
    reconnect_min_s: float = setting(1.0, "First reconnect delay; doubles up to reconnect_max_s.")
    reconnect_max_s: float = setting(60.0, "Longest reconnect delay.")
    session_expiry_s: int = setting(
        86400, "How long the broker keeps our session (subscriptions, queued QoS 1 messages) while we are offline."
    )
    max_queued_messages: int = setting(2000, "Outgoing QoS 1 messages kept while disconnected; 0 means no limit.")

    def password(self) -> str | None:
        if self.password_env and os.environ.get(self.password_env):
            return os.environ[self.password_env]
        if self.password_file:
            try:
                return Path(self.password_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"broker.password_file {self.password_file!r} cannot be read: {exc}") from None
        return None


# --- aggregator ----------------------------------------------------------------


@dataclass
class JobSection:
    name: str = setting("default", "Job name; it becomes the topic level fedge/v1/<name>/.")
    model: str = setting("fedge.models:digits_mlp", "Model factory as module:callable returning a torch.nn.Module.")
    model_args: dict = setting({}, "Keyword arguments for the model factory.")
    seed: int = setting(0, "Seed for the initial model and client selection.")
    rounds: int = setting(30, "Rounds to run; the job then announces state=done.")
    state_dir: str = setting("fedge-aggregator-state", "Checkpoints and the per-round log (rounds.jsonl) live here.")


@dataclass
class SelectionSection:
    fraction: float = setting(1.0, "Fraction C of the online clients selected each round.")
    min_clients: int = setting(2, "Fewest clients selected per round; a round waits until this many are online.")
    max_clients: int = setting(0, "Most clients selected per round; 0 means no cap.")
    quorum: float = setting(
        1.0, "Close the round early once this fraction of the selected clients has reported (over-selection)."
    )
    min_updates: int = setting(1, "Fewest updates a round may aggregate; below it at the deadline the round fails.")
    deadline_s: float = setting(120.0, "Seconds a round stays open; stragglers after it are late.")
    settle_s: float = setting(
        2.0, "Once enough clients are online, wait this long for more before selecting (presence arrives in bursts)."
    )


@dataclass
class TrainingSection:
    epochs: int = setting(1, "Local epochs E per round.")
    batch_size: int = setting(32, "Local batch size B.")
    lr: float = setting(0.05, "Client learning rate.")
    optimizer: str = setting("sgd", "Client optimizer: sgd or adam.")
    momentum: float = setting(0.0, "SGD momentum on the client.")
    weight_decay: float = setting(0.0, "Client weight decay.")
    prox_mu: float = setting(0.0, "FedProx proximal term mu; 0 is plain FedAvg local training.")
    loss: str = setting("cross_entropy", "Loss: cross_entropy, bce (binary, one logit) or mse.")
    max_steps: int = setting(0, "Cap on local optimizer steps per round; 0 means no cap.")


@dataclass
class CodecSection:
    name: str = setting(
        "int2", "Update codec the clients use: none, fp16, int8, int4, int2 or topk (int2: unbiased ternary)."
    )
    params: dict = setting(
        {"lossless": "zlib"},
        "Parameters of the named codec: block (int*), fraction and values (topk), lossless (zlib), ef (error "
        "feedback). Naming a codec without params means none.",
    )

    @property
    def spec(self) -> dict[str, Any]:
        """The codec as rounds announce it: name and parameters in one dict."""
        return {"name": self.name, **self.params}

    @spec.setter
    def spec(self, value: dict[str, Any]) -> None:
        self.name = value["name"]
        self.params = {k: v for k, v in value.items() if k != "name"}


@dataclass
class DownlinkSection:
    codec: dict = setting(
        {"name": "int4", "block": 64, "lossless": "zlib"},
        "How the model's change since the last key travels to devices; {name = \"none\"}: a full model every round.",
    )
    key_every: int = setting(50, "Publish a full key model every this many rounds; deltas build on the latest key.")


@dataclass
class ServerSection:
    optimizer: str = setting("fedavg", "Server optimizer: fedavg, fedavgm, fedadam or fedyogi.")
    lr: float = setting(1.0, "Server learning rate (1.0 with fedavg is plain FedAvg).")
    momentum: float = setting(0.9, "Server momentum for fedavgm.")
    beta1: float = setting(0.9, "First-moment decay for fedadam/fedyogi.")
    beta2: float = setting(0.99, "Second-moment decay for fedadam/fedyogi.")
    tau: float = setting(1e-3, "Adaptivity epsilon for fedadam/fedyogi.")
    max_samples_per_update: int = setting(
        1_000_000, "Updates claiming more samples are rejected (bounds one client's weight)."
    )


@dataclass
class EvaluateSection:
    data: str = setting("", "Held-out data as module:callable (arrays or torch Dataset); empty: no evaluation.")
    args: dict = setting({}, "Keyword arguments for the evaluation data callable.")
    batch_size: int = setting(1024, "Evaluation batch size.")
    every: int = setting(1, "Evaluate every k rounds (and always after the last one).")


@dataclass
class OnnxSection:
    every: int = setting(
        0, "Publish the global model as ONNX every k closed rounds (and after the last one); 0: never."
    )
    name: str = setting("model", "Artifact name: devices read it from fedge/v1/<job>/artifact/<name>/.")
    inputs: list = setting([], "Input signature, e.g. [\"x:1x64:float32\"]; the first dimension is the batch.")
    opset: int = setting(17, "ONNX opset (17: ONNX Runtime on a Raspberry Pi and TensorRT 8.6 on a Jetson).")
    quantize: str = setting("static", "none (float32), static (int8 QDQ), dynamic (int8) or fp16.")
    target: str = setting("arm64", "Quantization preset: arm64, x86 or jetson.")
    calibration: str = setting(
        "", "Calibration data for static int8 (.npz or module:callable); empty: the [evaluate] data."
    )
    calibration_args: dict = setting({}, "Keyword arguments for the calibration callable.")
    max_accuracy_drop: float = setting(
        0.0, "Refuse a quantized model that loses more accuracy points than this on the [evaluate] data; 0: no gate."
    )
    timeout_s: float = setting(900.0, "An export that takes longer is abandoned (the job goes on).")


@dataclass
class LimitsSection:
    max_update_bytes: int = setting(64 << 20, "Largest update accepted, in bytes.")
    reassembly_bytes: int = setting(256 << 20, "Memory for partially received updates, across all clients.")
    reassembly_timeout_s: float = setting(120.0, "A partially received message is dropped after this long.")


@dataclass
class AggregatorConfig:
    job: JobSection = section(JobSection, "The job: model, seed, length, where state lives.")
    selection: SelectionSection = section(SelectionSection, "Who takes part in a round and when it closes.")
    training: TrainingSection = section(TrainingSection, "Local training plan announced to clients each round.")
    codec: CodecSection = section(CodecSection, "How clients compress their deltas (uplink).")
    downlink: DownlinkSection = section(DownlinkSection, "How the global model reaches devices (downlink).")
    server: ServerSection = section(ServerSection, "Server-side optimizer applied to the averaged delta.")
    evaluate: EvaluateSection = section(EvaluateSection, "Held-out evaluation of each new global model.")
    onnx: OnnxSection = section(OnnxSection, "ONNX exports of the global model for inference-only devices.")
    limits: LimitsSection = section(LimitsSection, "Bounds that protect the aggregator from bad input.")
    broker: BrokerSettings = section(BrokerSettings, "How to reach the MQTT broker.")


# --- agent ---------------------------------------------------------------------


@dataclass
class AgentSection:
    id: str = setting("", "Device id, its own topic level; empty: the host name.")
    role: str = setting("trainer", "trainer (trains rounds) or inference (serves the published ONNX model only).")
    job: str = setting("default", "Job to take part in.")
    state_dir: str = setting("fedge-agent-state", "Where the agent keeps its state between restarts.")
    model: str = setting(
        "", "Model factory this device accepts; empty: only the built-in fedge.models factories."
    )
    max_model_bytes: int = setting(256 << 20, "Largest global model the agent will download, in bytes.")
    downlink: str = setting(
        "on_demand", "on_demand: fetch the model only when selected (fewest bytes); follow: keep every model."
    )
    resend_after_s: float = setting(20.0, "Resend an update not acknowledged after this long (doubling).")


@dataclass
class DataSection:
    factory: str = setting(
        "fedge.datasets:digits", "Local data as module:callable returning (x, y) arrays or a torch Dataset."
    )
    args: dict = setting({}, "Keyword arguments for the data callable.")


@dataclass
class WorkerSection:
    mode: str = setting(
        "per_round", "Training worker: per_round (no PyTorch in memory while idle) or warm (kept between rounds)."
    )
    threads: int = setting(0, "PyTorch threads in the worker; 0: all cores.")
    python: str = setting(
        "", "Python interpreter that runs training (one with PyTorch, e.g. JetPack's); empty: the agent's own."
    )
    timeout_s: float = setting(3600.0, "A training run longer than this is killed and declined.")


@dataclass
class InferenceSection:
    artifact: str = setting("model", "Name of the published ONNX artifact to download and serve.")
    serve: str = setting("", "host:port for a local HTTP prediction API (POST /predict); empty: none.")
    threads: int = setting(0, "ONNX Runtime threads; 0: all cores.")


@dataclass
class AgentConfig:
    agent: AgentSection = section(AgentSection, "This device.")
    data: DataSection = section(DataSection, "The device's local data; it never leaves the device.")
    worker: WorkerSection = section(WorkerSection, "The process that runs training.")
    inference: InferenceSection = section(InferenceSection, "Inference-only devices (agent.role = inference).")
    broker: BrokerSettings = section(BrokerSettings, "How to reach the MQTT broker.")

    def client_id(self) -> str:
        return self.agent.id or socket.gethostname().split(".")[0]


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


def load(path: str | Path | None, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read a TOML file (or none: all defaults) and apply ``section.key=value``
    overrides (values in TOML syntax, strings may be bare)."""
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
    codec = data.get("codec")
    if cls is AggregatorConfig and isinstance(codec, dict) and "name" in codec and "params" not in codec:
        # The default parameters belong to the default codec: naming another
        # codec (name = "int8") means that codec with its own defaults, not
        # with the default codec's zlib stage.
        codec["params"] = {}
    where = f"{path}: " if path else ""
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


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
            out.append(f"# {sf.metadata['doc']}")
            out.append(f"{key} = {_toml_value(getattr(sub, key))}")
        out.append("")
    return "\n".join(out)


def to_dict(instance: Any) -> dict[str, Any]:
    return dataclasses.asdict(instance)
