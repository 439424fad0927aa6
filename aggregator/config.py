"""The aggregator's configuration: its sections, their defaults (the one
source: the round core is built from these, never from defaults of its own)
and their checks. Policies built from it (``aggregator.policy.RoundPolicy``,
``aggregator.robust.Defences``) declare their fields with ``configured``: the
config key each one takes, and that key's default.

``AggregatorConfig.check`` runs whenever a config is loaded and whenever an
``AggregatorService`` is built, so a programmatic caller (the demo, a
benchmark, a test) gets the same one-line ``ConfigError`` as the command
line. Configs are immutable: build a changed copy with
``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedge.config import (
    DECAY,
    FRACTION,
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
from fedge.messages import LIST_MAX
from fedge.metrics import MetricsSettings


@dataclass(frozen=True)
class JobSection:
    name: str = setting("default", "Job name; it becomes the topic level fedge/v1/<name>/.")
    model: str = setting("fedge.models:digits_mlp", "Model factory as module:callable returning a torch.nn.Module.")
    model_args: dict = setting({}, "Keyword arguments for the model factory.")
    seed: int = setting(0, "Seed for the initial model and client selection.", NON_NEGATIVE)
    rounds: int = setting(30, "Rounds to run; the job then announces state=done.", at_least(1))
    state_dir: str = setting("fedge-aggregator-state", "Checkpoints and the per-round log (rounds.jsonl) live here.")
    linger_s: float = setting(
        0.0, "After the last round (or the privacy budget), keep running this many seconds: the final state stays "
        "published, metrics keep being served (fedge_job_done 1), late updates get their receipts; then exit 0. "
        "0: until stopped (SIGTERM, Ctrl-C), as a service should.", Range(0, lo_open=True, zero="until stopped")
    )


@dataclass(frozen=True)
class SelectionSection:
    fraction: float = setting(1.0, "Fraction C of the online clients selected each round.", FRACTION)
    min_clients: int = setting(2, "Fewest clients selected per round; a round waits until this many are online.",
                               at_least(1))
    max_clients: int = setting(0, "Most clients selected per round; 0 means no cap.", NON_NEGATIVE)
    quorum: float = setting(
        1.0, "Close the round early once this fraction of the selected clients has reported (over-selection).", FRACTION
    )
    min_updates: int = setting(1, "Fewest updates a round may aggregate; below it at the deadline the round fails.",
                               at_least(1))
    deadline_s: float = setting(120.0, "Seconds a round stays open; stragglers after it are late.", POSITIVE)
    settle_s: float = setting(
        2.0, "Once enough clients are online, wait this long for more before selecting (presence arrives in bursts).",
        NON_NEGATIVE
    )
    offline_grace_s: float = setting(
        5.0, "When only selected devices that went offline are still awaited, close the round this much later "
        "(a device that reconnects at once still makes it) instead of at the deadline.", NON_NEGATIVE
    )
    list_max: int = setting(
        200, "A round that selects more devices than this does not list them in its announcement, which every "
        f"device downloads; it sends each an invitation on its own receipt topic instead. 0 to {LIST_MAX}.",
        Range(0, LIST_MAX)
    )


@dataclass(frozen=True)
class TrainingSection:
    epochs: int = setting(1, "Local epochs E per round.", at_least(1))
    batch_size: int = setting(32, "Local batch size B.", at_least(1))
    lr: float = setting(0.05, "Client learning rate.", POSITIVE)
    optimizer: str = setting("sgd", "Client optimizer: sgd or adam.")
    momentum: float = setting(0.0, "SGD momentum on the client.", DECAY)
    weight_decay: float = setting(0.0, "Client weight decay.", NON_NEGATIVE)
    prox_mu: float = setting(0.0, "FedProx proximal term mu; 0 is plain FedAvg local training.", NON_NEGATIVE)
    loss: str = setting("cross_entropy", "Loss: cross_entropy, bce (binary, one logit) or mse.")
    max_steps: int = setting(0, "Cap on local optimizer steps per round; 0 means no cap.", NON_NEGATIVE)


@dataclass(frozen=True)
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

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CodecSection:
        """The section for a codec spec as users write it (``{"name": "int8", "block": 256}``)."""
        return cls(name=spec["name"], params={k: v for k, v in spec.items() if k != "name"})


@dataclass(frozen=True)
class DownlinkSection:
    codec: dict = setting(
        {"name": "int4", "block": 64, "lossless": "zlib"},
        "How the model's change since the last key travels to devices; {name = \"none\"}: a full model every round.",
    )
    key_every: int = setting(50, "Publish a full key model every this many rounds; deltas build on the latest key.",
                             at_least(1))


@dataclass(frozen=True)
class ServerSection:
    mode: str = setting(
        "synchronous", "synchronous: rounds (select, wait for a quorum or the deadline, step); buffered: buffered "
        "asynchronous aggregation (FedBuff, Nguyen et al. 2022): [buffered] concurrency devices train at once, "
        "each update is folded as it arrives, and every [buffered] buffer_size updates make a model version "
        "(job.rounds counts versions)."
    )
    optimizer: str = setting("fedavg", "Server optimizer: fedavg, fedavgm, fedadam or fedyogi.")
    lr: float = setting(1.0, "Server learning rate (1.0 with fedavg is plain FedAvg).", POSITIVE)
    momentum: float = setting(0.9, "Server momentum for fedavgm.", DECAY)
    beta1: float = setting(0.9, "First-moment decay for fedadam/fedyogi.", DECAY)
    beta2: float = setting(0.99, "Second-moment decay for fedadam/fedyogi.", DECAY)
    tau: float = setting(1e-3, "Adaptivity epsilon for fedadam/fedyogi.", POSITIVE)
    max_samples_per_update: int = setting(
        1_000_000, "Updates claiming more samples are rejected (an absolute bound; weight_cap is the relative one).",
        at_least(1)
    )
    aggregation: str = setting(
        "mean", "How a round's updates combine: mean (weighted, FedAvg), median, trimmed_mean or krum (multi-Krum)."
    )
    clip: str = setting(
        "adaptive", "Norm bound on every update: adaptive (clip_multiplier x the median norm of the round's "
        "first updates and recent rounds), fixed (clip_norm) or off."
    )
    clip_norm: float = setting(0.0, "The L2 bound on an update's delta when clip = \"fixed\".", NON_NEGATIVE)
    clip_multiplier: float = setting(
        1.25, "Adaptive bound: this many times the median update norm (the round's first and recent rounds').",
        POSITIVE
    )
    weight_cap: float = setting(
        2.0, "No update counts more samples than weight_cap x the median sample count (of the round's first "
        "updates and recent rounds), whatever it claims; 0: no cap. At least 1.", at_least(1, zero="no cap")
    )
    trim_fraction: float = setting(0.1, "trimmed_mean: fraction of the largest and of the smallest values dropped.",
                                   Range(0, 0.5, hi_open=True))
    krum_f: int = setting(1, "krum: hostile updates per round to tolerate (f).", NON_NEGATIVE)
    krum_m: int = setting(0, "krum: updates averaged after scoring; 0: n - f.", NON_NEGATIVE)
    direction: str = setting(
        "momentum", "Leave out updates that point away from where the fleet has been going: momentum (cosine to "
        "a momentum of the direction every update of each round agreed on, below the round's cutoff) or off."
    )
    direction_beta: float = setting(0.9, "direction: decay of the momentum of agreed directions, in [0, 1).", DECAY)
    direction_tau: float = setting(0.0, "direction: the highest cutoff: an update whose cosine to the momentum is "
                                   "below it is left out, the cutoff lowered to the previous round's median cosine "
                                   "less three robust deviations where honest devices spread wider; in [-1, 1).",
                                   Range(-1, 1, hi_open=True))


@dataclass(frozen=True)
class BufferedSection:
    concurrency: int = setting(
        10, "Devices training at once: the aggregator invites available devices as others finish.", at_least(1))
    buffer_size: int = setting(
        10, "K: updates folded into each model version; a device adds at most one update to a version. The "
        "job waits for this many eligible devices online.", at_least(1))
    max_staleness: int = setting(
        10, "An update trained from a version more than this many versions old is refused (a late receipt).",
        NON_NEGATIVE)
    staleness: str = setting(
        "polynomial", "How an update trained s versions ago is weighed: polynomial (1 / (1 + s)^staleness_exponent), "
        "constant (1) or hinge (1 up to hinge_after, then 1 / (1 + hinge_slope x (s - hinge_after))).")
    staleness_exponent: float = setting(0.5, "polynomial: the exponent a of 1 / (1 + s)^a.", NON_NEGATIVE)
    hinge_after: int = setting(4, "hinge: staleness weighed fully.", NON_NEGATIVE)
    hinge_slope: float = setting(1.0, "hinge: how fast the weight falls after hinge_after.", NON_NEGATIVE)


@dataclass(frozen=True)
class RelaysSection:
    min_relays: int = setting(
        0, "0: devices talk to this aggregator. N >= 1: this aggregator is the root of a relayed job: each region's "
        "relay (fedge relay --region NAME, with this same config) runs the round among its devices and sends the "
        "root one sum; a round opens once N relays are online.", NON_NEGATIVE)
    margin_s: float = setting(
        5.0, "A relay closes its region's round this many seconds before the root's selection.deadline_s, so that "
        "its sum reaches the root in time.", NON_NEGATIVE)
    root_key: str = setting(
        "", "A relay's pin of the root's public key (ed25519:..., logged when the root starts): it believes only "
        "the root's announcements and receipts signed with it. Required for a relay when identity.signing = "
        "\"required\"; the root ignores it.")


@dataclass(frozen=True)
class EvaluateSection:
    data: str = setting("", "Held-out data as module:callable (arrays or torch Dataset); empty: no evaluation.")
    args: dict = setting({}, "Keyword arguments for the evaluation data callable.")
    batch_size: int = setting(1024, "Evaluation batch size.", at_least(1))
    every: int = setting(1, "Evaluate every k rounds (and always after the last one).", at_least(1))


@dataclass(frozen=True)
class OnnxSection:
    every: int = setting(
        0, "Publish the global model as ONNX every k closed rounds (and after the last one); 0: never.", NON_NEGATIVE
    )
    name: str = setting("model", "Artifact name: devices read it from fedge/v1/<job>/artifact/<name>/.")
    inputs: list = setting([], "Input signature, e.g. [\"x:1x64:float32\"]; the first dimension is the batch.")
    opset: int = setting(17, "ONNX opset (17: ONNX Runtime on a Raspberry Pi and TensorRT 8.6 on a Jetson).",
                         at_least(13))
    quantize: str = setting("static", "none (float32), static (int8 QDQ), dynamic (int8) or fp16.")
    target: str = setting("arm64", "Quantization preset: arm64, x86 or jetson.")
    calibration: str = setting(
        "", "Calibration data for static int8 (.npz or module:callable); empty: the [evaluate] data."
    )
    calibration_args: dict = setting({}, "Keyword arguments for the calibration callable.")
    max_accuracy_drop: float = setting(
        0.0, "Refuse a quantized model that loses more accuracy points than this on the [evaluate] data; 0: no gate.",
        Range(0, 100)
    )
    timeout_s: float = setting(900.0, "An export that takes longer is abandoned (the job goes on).", POSITIVE)

    def check(self) -> None:
        if self.every <= 0:
            return
        from fedge.signature import SignatureError, parse_input_spec
        from fedge.topics import check_id

        if not self.inputs:
            raise ConfigError('onnx.inputs is empty: give the input signature, e.g. inputs = ["x:1x64:float32"]')
        for spec in self.inputs:
            try:
                parse_input_spec(spec)
            except SignatureError as exc:
                raise ConfigError(f"onnx.inputs: {exc}") from None
        if self.quantize not in ("none", "static", "dynamic", "fp16"):
            raise ConfigError(f"onnx.quantize {self.quantize!r} is not known; use none, static, dynamic or fp16")
        if self.target not in ("arm64", "x86", "jetson"):
            raise ConfigError(f"onnx.target {self.target!r} is not known; use arm64, x86 or jetson")
        _checked_id(check_id, self.name, "onnx.name")
        # The export runs in a child of this interpreter: its toolchain must be here.
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"onnx.every = {self.every} needs the export toolchain ({', '.join(missing)} missing): "
                              "pip install 'fedge[aggregator,export]' in the aggregator's environment")


@dataclass(frozen=True)
class LimitsSection:
    max_update_bytes: int = setting(64 << 20, "Largest update accepted, in bytes.", at_least(1))
    reassembly_bytes: int = setting(256 << 20, "Memory for partially received updates, across all clients.",
                                    at_least(1))
    reassembly_timeout_s: float = setting(120.0, "A partially received message is dropped after this long.", POSITIVE)
    messages_per_s: float = setting(
        20.0, "Per device: messages (updates, declines, presence) accepted per second on average; more are "
        "dropped. Keep it above the rounds per second a job runs (the demo runs up to 10).", POSITIVE
    )
    message_burst: int = setting(100, "Per device: messages accepted at once before messages_per_s applies.",
                                 at_least(1))
    max_devices: int = setting(
        100_000, "Most device ids the aggregator keeps track of; presence from further new ids is ignored (counted).",
        at_least(1)
    )
    aggregation_bytes: int = setting(
        1 << 30, "Memory a robust rule (median, trimmed_mean, krum) may use to hold a round's updates dense; "
        "the job refuses to start when selection.max_clients x 4 bytes x parameters exceeds it.", at_least(1)
    )


@dataclass(frozen=True)
class IdentitySection:
    signing: str = setting(
        "required", "required: the aggregator signs all it publishes and takes part only enrolled devices' signed "
        "presence and updates (fedge enroll); off: anyone who can publish on the broker is believed."
    )
    key_file: str = setting(
        "", "The aggregator's private key; empty: aggregator.key in the state directory, made at the first start."
    )

    def check(self) -> None:
        from fedge.identity import SIGNING_MODES

        if self.signing not in SIGNING_MODES:
            raise ConfigError(f"identity.signing {self.signing!r} is not known; use required or off")


@dataclass(frozen=True)
class PrivacySection:
    mode: str = setting(
        "off", "Client-level differential privacy: off; central (DP-FedAvg, McMahan et al. 2018: devices clip "
        "their update to clip, the aggregator clips again, adds Gaussian noise of standard deviation "
        "noise_multiplier x clip to the sum and divides by the expected number of devices); or distributed "
        "(each device adds its share of that noise before compressing, the aggregator adds only what missing "
        "devices did not: for use with secure aggregation). On, devices are chosen by Poisson sampling at "
        "sampling_rate, not by selection.fraction, and every round releases a model."
    )
    clip: float = setting(1.0, "C: the L2 bound on one device's update (where it starts, with clip_quantile).",
                          POSITIVE)
    clip_quantile: float = setting(
        0.0, "0: a fixed clip. In (0, 1): adaptive clipping (Andrew et al. 2021): the clip follows this quantile "
        "of the devices' update norms, from a noised count of updates within it.", DECAY
    )
    clip_learning_rate: float = setting(0.2, "Adaptive clipping's geometric step: clip x exp(-rate x error).", POSITIVE)
    clip_bit_noise: float = setting(
        5.0, "Adaptive clipping: standard deviation of the noise on the count of updates within the clip "
        "(Andrew et al.: the expected devices per round / 20). Its privacy cost is taken from the model's "
        "noise, so that the two together spend what noise_multiplier states.", NON_NEGATIVE
    )
    noise_multiplier: float = setting(1.0, "z: the noise on the sum has standard deviation z x clip.", POSITIVE)
    sampling_rate: float = setting(
        0.1, "q: each eligible device is in a round independently with this probability (Poisson sampling, "
        "as the accountant assumes).", FRACTION
    )
    delta: float = setting(1e-5, "The delta of (epsilon, delta); below 1 / the number of devices.",
                           Range(0, 1, lo_open=True, hi_open=True))
    accountant: str = setting("rdp", "dp-accounting's accountant: rdp or pld (tighter, slower).")
    min_devices: int = setting(
        0, "N: a private round opens only once this many eligible devices are online, and samples an expected "
        "sampling_rate x N of them (each with probability sampling_rate x N / online, never above sampling_rate), "
        "dividing its noised sum by that fixed number whoever is online; 0: selection.min_clients. Set it to "
        "the fleet's size: sampling_rate x N must be at least 1.", NON_NEGATIVE
    )
    target_epsilon: float = setting(
        0.0, "The budget: the job stops before a round whose epsilon would exceed it; 0: no budget.", NON_NEGATIVE
    )


@dataclass(frozen=True)
class SecAggSection:
    mode: str = setting(
        "off", "Secure aggregation (SecAgg+, Bonawitz et al. 2017 with Bell et al. 2020's neighbourhood graph): "
        "off, or on: each device masks its update so that the aggregator learns only the round's sum. On, the "
        "uplink is masked integers (not codec.*), every update weighs one, and per-update defences (server.clip, "
        "weight_cap, direction) cannot look inside an update: each coordinate is bounded by bound instead."
    )
    threshold: int = setting(
        0, "t: shares that rebuild a device's secrets; fewer reveal nothing. 0: a majority of its share holders "
        "(itself and its neighbours).", NON_NEGATIVE
    )
    degree: int = setting(
        0, "Neighbours each device masks with and shares to; 0: min(n - 1, 2 ceil(log2 n) + 2) for n selected "
        "devices (every other device up to 10).", NON_NEGATIVE
    )
    bits: int = setting(16, "Bits per coordinate of a device's update, sign included (2..24); the sum gets "
                        "ceil(log2(n)) more so that it cannot wrap.", Range(2, 24))
    bound: float = setting(
        0.0, "The largest |coordinate| of an update: coordinates are clamped to it before they become integers. "
        "0: the privacy clip (required when privacy is off).", NON_NEGATIVE
    )
    stage_s: float = setting(
        20.0, "Seconds each of the key, share and unmask stages may take; the masked inputs come with the updates, "
        "within the round's deadline.", POSITIVE
    )


@dataclass(frozen=True)
class AggregatorConfig:
    job: JobSection = section(JobSection, "The job: model, seed, length, where state lives.")
    selection: SelectionSection = section(SelectionSection, "Who takes part in a round and when it closes.")
    training: TrainingSection = section(TrainingSection, "Local training plan announced to clients each round.")
    codec: CodecSection = section(CodecSection, "How clients compress their deltas (uplink).")
    downlink: DownlinkSection = section(DownlinkSection, "How the global model reaches devices (downlink).")
    server: ServerSection = section(ServerSection, "Server-side optimizer applied to the averaged delta.")
    buffered: BufferedSection = section(BufferedSection, "Buffered asynchronous aggregation (server.mode = buffered).")
    relays: RelaysSection = section(RelaysSection, "A job relayed through regions: the root's side (fedge relay).")
    evaluate: EvaluateSection = section(EvaluateSection, "Held-out evaluation of each new global model.")
    onnx: OnnxSection = section(OnnxSection, "ONNX exports of the global model for inference-only devices.")
    limits: LimitsSection = section(LimitsSection, "Bounds that protect the aggregator from bad input.")
    identity: IdentitySection = section(IdentitySection, "Who may take part, and how devices know the aggregator.")
    privacy: PrivacySection = section(PrivacySection, "Client-level differential privacy and its budget.")
    secagg: SecAggSection = section(SecAggSection, "Secure aggregation: the aggregator learns only each round's sum.")
    metrics: MetricsSettings = section(MetricsSettings, "Prometheus metrics over HTTP (off by default).")
    broker: BrokerSettings = section(BrokerSettings, "How to reach the MQTT broker.")


    @classmethod
    def prepare(cls, data: dict[str, Any]) -> None:
        """The default codec parameters belong to the default codec: naming
        another codec (name = "int8") means that codec with its own defaults,
        not with the default codec's zlib stage."""
        codec = data.get("codec")
        if isinstance(codec, dict) and "name" in codec and "params" not in codec:
            codec["params"] = {}

    def _check_server(self) -> None:
        from aggregator.optimizers import SERVER_OPTIMIZERS
        from aggregator.robust import CLIPS, DIRECTIONS, RULES

        srv = self.server
        if srv.mode not in ("synchronous", "buffered"):
            raise ConfigError(f"server.mode {srv.mode!r} is not known; use synchronous or buffered")
        if srv.mode == "buffered":
            self._check_buffered()
        if self.relays.min_relays:
            self._check_relays()
        if srv.optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError(f"server.optimizer {srv.optimizer!r} is not known; "
                              f"use one of {', '.join(SERVER_OPTIMIZERS)}")
        if srv.aggregation not in RULES:
            raise ConfigError(f"server.aggregation {srv.aggregation!r} is not known; use one of {', '.join(RULES)}")
        if srv.clip not in CLIPS:
            raise ConfigError(f"server.clip {srv.clip!r} is not known; use one of {', '.join(CLIPS)}")
        if srv.clip == "fixed" and not srv.clip_norm > 0:
            raise ConfigError("server.clip = \"fixed\" needs server.clip_norm > 0")
        if srv.clip == "adaptive" and not srv.clip_multiplier > 0:
            raise ConfigError("server.clip_multiplier must be positive (or set server.clip = \"off\")")
        if srv.weight_cap != 0 and not srv.weight_cap >= 1:
            raise ConfigError("server.weight_cap must be 0 (no cap) or at least 1 (the median sample count)")
        if not 0 <= srv.trim_fraction < 0.5:
            raise ConfigError("server.trim_fraction must be in [0, 0.5)")
        if srv.krum_f < 0 or srv.krum_m < 0:
            raise ConfigError("server.krum_f and server.krum_m must not be negative")
        if srv.direction not in DIRECTIONS:
            raise ConfigError(f"server.direction {srv.direction!r} is not known; use one of {', '.join(DIRECTIONS)}")
        if not 0 <= srv.direction_beta < 1 or not -1 <= srv.direction_tau < 1:
            raise ConfigError("server.direction_beta must be in [0, 1) and server.direction_tau in [-1, 1)")

    def _check_buffered(self) -> None:
        from aggregator.staleness import STALENESS

        buf = self.buffered
        if buf.staleness not in STALENESS:
            raise ConfigError(f"buffered.staleness {buf.staleness!r} is not known; use one of {', '.join(STALENESS)}")
        if self.secagg.mode != "off":
            raise ConfigError("secagg.mode = \"on\" cannot run with server.mode = \"buffered\": SecAgg+ masks a "
                              "cohort fixed before anyone trains, and a buffer's cohort is whoever finishes first; "
                              "use server.mode = \"synchronous\"")
        dp = self.privacy
        if dp.mode == "off":
            return
        # Noise per version on at most one clipped update per device, divided by buffer_size, and no
        # sampling assumption: devices are invited as they become available, no secret random sample.
        if dp.mode != "central":
            raise ConfigError(f"privacy.mode = {dp.mode!r} with server.mode = \"buffered\" is not supported: use "
                              "central (the aggregator adds each version's noise)")
        if dp.sampling_rate != 1:
            raise ConfigError(f"privacy.sampling_rate = {dp.sampling_rate:g} with server.mode = \"buffered\": set it "
                              "to 1. A buffered job invites devices as they become available, which is no secret "
                              "random sample, so the accountant counts every version as a release of every device "
                              "(no amplification by sampling)")
        if dp.clip_quantile != 0:
            raise ConfigError("privacy.clip_quantile with server.mode = \"buffered\" is not supported yet: set it to "
                              "0 (a fixed clip)")
        if dp.min_devices not in (0, self.buffered.buffer_size):
            raise ConfigError(f"privacy.min_devices = {dp.min_devices} with server.mode = \"buffered\": leave it 0; "
                              f"each version's noised sum is divided by buffered.buffer_size "
                              f"({self.buffered.buffer_size}), the updates it folds")

    def _check_relays(self) -> None:
        """What a relayed job cannot do yet, or cannot do at all, in one line each."""
        rel, mode = self.relays, "relays.min_relays > 0"
        if self.server.mode != "synchronous":
            raise ConfigError(f"{mode} runs synchronous rounds only (for now): set server.mode = \"synchronous\"")
        if self.server.aggregation != "mean":
            raise ConfigError(f"{mode} needs server.aggregation = \"mean\": each relay sends the root its region's "
                              f"sum, and a {self.server.aggregation} of each region is no sum the root can add up")
        if self.privacy.mode != "off" or self.secagg.mode != "off":
            raise ConfigError(f"{mode} does not run with privacy or secure aggregation yet: set privacy.mode and "
                              "secagg.mode to \"off\", or let the devices talk to one aggregator (min_relays = 0)")
        if not rel.margin_s < self.selection.deadline_s:
            raise ConfigError(f"relays.margin_s ({rel.margin_s:g}) must be less than selection.deadline_s "
                              f"({self.selection.deadline_s:g}): a relay closes its region's round that much sooner")

    def dp_devices(self) -> int:
        """What ``privacy.min_devices = 0`` stands for: selection.min_clients,
        or a buffered job's buffer_size (the updates each version folds)."""
        return self.buffered.buffer_size if self.server.mode == "buffered" else self.selection.min_clients

    def _check_privacy(self) -> None:
        from aggregator.privacy import MODES, DpPolicy

        dp = self.privacy
        if dp.mode not in MODES:
            raise ConfigError(f"privacy.mode {dp.mode!r} is not known; use one of {', '.join(MODES)}")
        if dp.mode == "off":
            return
        try:
            DpPolicy.from_config(dp, self.dp_devices())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.server.aggregation != "mean":
            raise ConfigError(f"privacy.mode = {dp.mode!r} needs server.aggregation = \"mean\" (the accountant "
                              f"covers a clipped sum with Gaussian noise, not {self.server.aggregation})")
        if dp.mode == "distributed" and self.codec.name != "none" and self.secagg.mode == "off":
            raise ConfigError(f"privacy.mode = \"distributed\" needs codec.name = \"none\" (float32; zlib may "
                              f"stay): each device's noise share must reach the sum exactly for the sum's noise to "
                              f"be Gaussian, and {self.codec.name} would quantize every share apart")

    def _check_secagg(self) -> None:
        sa = self.secagg
        if sa.mode not in ("off", "on"):
            raise ConfigError(f"secagg.mode {sa.mode!r} is not known; use off or on")
        if sa.mode == "off":
            return
        if self.server.aggregation != "mean":
            raise ConfigError(f"secagg.mode = \"on\" needs server.aggregation = \"mean\": the aggregator sees only "
                              f"the sum, which {self.server.aggregation} cannot be computed from")
        if self.privacy.mode != "off" and sa.bound != 0:
            raise ConfigError(f"secagg.bound = {sa.bound:g} with privacy on: leave it 0, the privacy clip bounds "
                              f"every coordinate (and the integer noise is sized for it)")
        if not 2 <= sa.bits <= 24:
            raise ConfigError(f"secagg.bits = {sa.bits}: use 2..24 (16 keeps quantization error far below the "
                              f"update's own)")
        if sa.threshold < 0 or sa.degree < 0:
            raise ConfigError("secagg.threshold and secagg.degree must be 0 (automatic) or positive")
        if sa.threshold == 1 or (sa.threshold and sa.degree and sa.threshold > sa.degree):
            raise ConfigError(f"secagg.threshold = {sa.threshold} must be at least 2 and at most secagg.degree "
                              f"({sa.degree})")
        if not (sa.bound >= 0 and math.isfinite(sa.bound)):
            raise ConfigError("secagg.bound must be a positive number, or 0 for the privacy clip")
        if sa.bound == 0 and self.privacy.mode == "off":
            raise ConfigError("secagg.bound = 0 takes the privacy clip, but privacy.mode is off: set secagg.bound "
                              "to the largest |coordinate| an update may have (e.g. 0.05)")
        if not sa.stage_s > 0:
            raise ConfigError("secagg.stage_s must be positive")
        if self.selection.min_clients < 3:
            raise ConfigError(f"secagg.mode = \"on\" needs selection.min_clients >= 3 (it is "
                              f"{self.selection.min_clients}): with two devices each could subtract its own update "
                              f"from the sum")

    def check(self) -> None:
        """Every value the service will use, checked now: one ``ConfigError`` line."""
        from fedge.codecs import CODECS, CodecError, make_codec
        from fedge.topics import check_id

        check_ranges(self)  # every number within its setting's range, before anything uses one
        self.broker.check()
        _checked_id(check_id, self.job.name, "job.name")
        self._check_privacy()
        self._check_secagg()
        if self.codec.name not in CODECS:
            raise ConfigError(f"codec.name {self.codec.name!r} is not known; use one of {', '.join(sorted(CODECS))}")
        for what, spec in (("codec", self.codec.spec), ("downlink.codec", self.downlink.codec)):
            try:
                make_codec(spec)
            except CodecError as exc:
                raise ConfigError(f"{what}: {exc}") from None
        if self.downlink.key_every < 1:
            raise ConfigError("downlink.key_every must be at least 1")
        self._check_server()
        if not self.limits.messages_per_s > 0 or self.limits.message_burst < 1:
            raise ConfigError("limits.messages_per_s must be positive and limits.message_burst at least 1")
        sel = self.selection
        rule = self.server.aggregation
        if rule != "mean" and sel.max_clients == 0:
            raise ConfigError(f"server.aggregation = {rule!r} holds every update of a round in memory: "
                              "set selection.max_clients to bound it")
        if not 0 < sel.fraction <= 1 or not 0 < sel.quorum <= 1:
            raise ConfigError("selection.fraction and selection.quorum must be in (0, 1]")
        if sel.min_clients < 1 or sel.min_updates < 1:
            raise ConfigError("selection.min_clients and selection.min_updates must be at least 1")
        self.onnx.check()
        self.identity.check()
        self.metrics.check()


def _checked_id(check_id: Any, value: str, what: str) -> None:
    try:
        check_id(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# --- policies built from the config ----------------------------------------------


def section_class(name: str) -> type:
    """The dataclass of the ``[name]`` section."""
    for f in dataclasses.fields(AggregatorConfig):
        if f.name == name:
            return f.default_factory  # type: ignore[return-value]  # section(cls, doc): the class itself
    raise KeyError(f"the aggregator config has no section [{name}]")


def _setting(section: str, key: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(section_class(section)):
        if f.name == key:
            return f
    raise KeyError(f"the aggregator config has no key {section}.{key}")


def configured(section: str, key: str, *, required: bool = False) -> Any:
    """A field of a policy built from the config: ``from_config`` gives it
    ``[section] key``, and its default is that key's (one source for it);
    ``required``: no default. An unknown section or key raises ``KeyError``
    when the policy class is defined."""
    meta = {"config": (section, key)}
    s = _setting(section, key)
    if required:
        return field(metadata=meta)
    if s.default is not dataclasses.MISSING:
        return field(default=s.default, metadata=meta)
    return field(default_factory=s.default_factory, metadata=meta)  # a dict or list setting: a fresh copy


def configured_keys(policy: type) -> dict[str, tuple[str, str]]:
    """Each ``configured`` field of ``policy`` and the (section, key) it takes."""
    return {f.name: f.metadata["config"] for f in dataclasses.fields(policy) if "config" in f.metadata}


def check_configured(policy: type, built: Iterable[str] = ()) -> None:
    """Raises ``LookupError`` unless every field of ``policy`` takes a config
    key that exists or is one of ``built`` (made by its ``from_config``)."""
    keys, built = configured_keys(policy), set(built)
    names = {f.name for f in dataclasses.fields(policy)}
    loose = sorted(names - keys.keys() - built)
    if loose:
        raise LookupError(f"{policy.__name__}: {', '.join(loose)} neither configured nor built")
    odd = sorted(built & keys.keys()) + sorted(built - names)
    if odd:
        raise LookupError(f"{policy.__name__}: {', '.join(odd)} built but configured too, or not a field")
    for name, (where, key) in keys.items():
        try:
            _setting(where, key)
        except KeyError as exc:
            raise LookupError(f"{policy.__name__}.{name}: {exc.args[0]}") from None
