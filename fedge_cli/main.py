"""The ``fedge`` command: one entry point that dispatches to the roles.

Each subcommand imports its role only when it runs, so ``fedge agent`` on a
device never loads the aggregator's or the export toolchain's dependencies
(the export subcommands' parser, ``export.cli``, imports no heavy library).

Exit codes: 0 success, 1 a run that failed, 2 a user mistake (bad config,
bad import path, missing file), reported as one line without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fedge import __version__
from fedge.errors import FedgeError, OneReasonError

log = logging.getLogger("fedge")


class UsageError(OneReasonError):
    """A user mistake: printed as one line, exit code 2."""

    default_reason = "usage"


def _setup_logging(level: str, fmt: str | None = None) -> None:
    from fedge import logs

    logs.setup(level, fmt)


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --- subcommands ---------------------------------------------------------------------


def _codec_arg(text: str | None) -> dict[str, Any] | None:
    from fedge.codecs import CodecError, parse_spec

    if text is None:
        return None
    try:
        return parse_spec(text)
    except CodecError as exc:
        raise UsageError(f"--codec: {exc}") from None


def _check_fleet_size(agents: int, embedded_broker: bool = False) -> None:
    from fedge.mqtt import MAX_LINKS_PER_PROCESS

    # An embedded broker holds the other end of every connection in the same
    # process, so its descriptors count against the same limit.
    limit = MAX_LINKS_PER_PROCESS * 3 // 4 if embedded_broker else MAX_LINKS_PER_PROCESS
    if agents > limit:
        raise UsageError(f"--agents {agents} is more MQTT connections than one process can watch "
                         f"(at most {limit}{' with the embedded broker' if embedded_broker else ''}); "
                         "run several processes with fewer agents each")


# Optional features and the extra that installs each: (module imported, distribution, extra).
EXTRAS = {
    "secure aggregation": ("Crypto.Protocol.SecretSharing", "pycryptodome", "secagg"),
    "metrics": ("prometheus_client", "prometheus-client", "metrics"),
}


def need_extra(feature: str, configured: str) -> None:
    """At start, before anything runs: one line naming the extra to install
    when ``feature`` is ``configured`` (the setting or flag that asks for it)
    and its package is missing, instead of an ImportError mid-round."""
    import importlib

    module, dist, extra = EXTRAS[feature]
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{feature} ({configured}) needs {dist}, which is not installed: "
                         f"pip install 'fedge[{extra}]'") from None


def has_extra(feature: str) -> bool:
    """``feature``'s package is installed: found, not imported (an idle agent
    does not load what it may never run)."""
    import importlib.util

    try:
        return importlib.util.find_spec(EXTRAS[feature][0].split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _check_flag(flag: str, value: float, ok: bool, allowed: str) -> None:
    """One line naming the flag, its value and what it may be, when not ``ok``."""
    if not ok or not math.isfinite(value):
        raise UsageError(f"{flag} {value:g} is out of range: use {allowed}")


def cmd_demo(args: argparse.Namespace) -> int:
    from fedge_cli.demo import DemoOptions, check_split, run_demo

    if args.agents < 2:
        raise UsageError("--agents must be at least 2")
    _check_flag("--rounds", args.rounds, args.rounds >= 1, "at least 1")
    _check_flag("--alpha", args.alpha, args.alpha > 0, "a number > 0 (the Dirichlet label skew: 0.1 is "
                "strongly skewed, 100 nearly IID)")
    _check_flag("--seed", args.seed, args.seed >= 0, "an integer >= 0")
    _check_flag("--workers", args.workers, args.workers >= 1, "at least 1")
    if args.target_epsilon is not None:
        _check_flag("--target-epsilon", args.target_epsilon, args.target_epsilon > 0,
                    "a number > 0 (the privacy budget), or leave the flag out for a demo without privacy")
    if args.secure_aggregation:
        need_extra("secure aggregation", "--secure-aggregation")
    if args.secure_aggregation and args.agents < 3:
        raise UsageError("--secure-aggregation needs --agents 3 or more (with two, each could subtract its own "
                         "update from the sum)")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout {args.dropout:g} must be in [0, 1): the probability an agent drops out of a round")
    if args.mode == "buffered" and (args.secure_aggregation or args.target_epsilon):
        raise UsageError("--mode buffered runs without --secure-aggregation and --target-epsilon (a buffered job "
                         "cannot run them yet); leave them out or use --mode synchronous")
    if args.relays and (args.mode == "buffered" or args.secure_aggregation or args.target_epsilon):
        raise UsageError("--relays runs synchronous rounds without --secure-aggregation and --target-epsilon (a "
                         "relayed job cannot run them yet); leave them out, or leave out --relays")
    if args.relays < 0 or args.relays > args.agents:
        raise UsageError(f"--relays {args.relays}: give 1 to --agents ({args.agents}) relays, a region each, or 0")
    if args.mode == "buffered" and args.agents < 4:
        raise UsageError("--mode buffered needs --agents 4 or more: half of them train at once, and a version "
                         "takes the updates of a quarter (at least two)")
    profile = args.profile if args.profile is not None else ("home-wifi" if args.mode == "buffered" else "")
    if profile:
        from edge_agent.sim.profiles import ProfileError, load

        try:
            load(profile)
        except ProfileError as exc:
            raise UsageError(f"--profile: {exc}") from None
    _check_fleet_size(args.agents, embedded_broker=args.broker is None)
    opts = DemoOptions(
        agents=args.agents, rounds=args.rounds, data=args.data, broker=args.broker, protocol=args.protocol,
        codec=_codec_arg(args.codec), seed=args.seed, alpha=args.alpha, workers=args.workers, json_path=args.json,
        state_dir=args.state_dir, signing=args.signing, target_epsilon=args.target_epsilon or 0.0,
        secure_aggregation=args.secure_aggregation, dropout=args.dropout, mode=args.mode, profile=profile,
        relays=args.relays,
    )
    try:
        check_split(opts)
    except ValueError as exc:
        raise UsageError(f"--alpha {args.alpha:g} with --agents {args.agents}: {exc}; raise --alpha or use fewer "
                         "agents") from None
    summary = run_demo(opts)
    # A demo whose every round failed did not show federated learning: not a success.
    all_failed = bool(summary["rounds"]) and summary["failed_rounds"] == len(summary["rounds"])
    return 0 if summary["finished"] and not all_failed else 1


def cmd_aggregator(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService
    from fedge import config

    cfg = config.load(args.config, AggregatorConfig, args.set)  # checked as it loads
    cfg.broker.password()  # an unreadable password file is named now, not after start-up
    if cfg.secagg.mode != "off":
        need_extra("secure aggregation", f"secagg.mode = \"{cfg.secagg.mode}\"")
    if cfg.metrics.enabled:
        need_extra("metrics", "metrics.enabled = true")
    service = AggregatorService(cfg)
    _on_signals(service.stop)
    log.info("aggregator for job %s on %s (state in %s)", cfg.job.name, cfg.broker.url, cfg.job.state_dir)
    return service.run()


def cmd_relay(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from aggregator.relay import RelayService, relay_config
    from fedge import config
    from fedge.config import ConfigError
    from fedge.files import writable_dir

    cfg = config.load(args.config, AggregatorConfig, args.set)  # the root's config, checked as it loads
    try:
        region_cfg = relay_config(cfg, args.region, args.state_dir)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    writable_dir(region_cfg.job.state_dir, "--state-dir")
    region_cfg.broker.password()
    service = RelayService(region_cfg, args.region)
    _on_signals(service.stop)
    log.info("relay %s of job %s on %s (state in %s)", args.region, cfg.job.name, cfg.broker.url,
             region_cfg.job.state_dir)
    return service.run()


def _devices(cfg: Any, count: int | None) -> list[Any]:
    from pathlib import Path

    from edge_agent.runtime import DeviceSpec
    from fedge.files import writable_dir

    # Before a device key is made in it: one line, not a traceback (each
    # device's StateDir checks its own directory again).
    writable_dir(cfg.agent.state_dir, "agent.state_dir")
    base = cfg.client_id()
    common = dict(job=cfg.agent.job, region=cfg.agent.region, receipts_qos=cfg.agent.receipts_qos,
                  data=cfg.data.factory, accepted_model=cfg.agent.model,
                  max_model_bytes=cfg.agent.max_model_bytes, resend_after_s=cfg.agent.resend_after_s,
                  role=cfg.agent.role, artifact=cfg.inference.artifact, threads=cfg.inference.threads,
                  downlink=cfg.agent.downlink, model_wait_s=cfg.agent.model_wait_s)
    if count is None:
        state_dir = Path(cfg.agent.state_dir)
        return [DeviceSpec(client_id=base, data_args=dict(cfg.data.args), state_dir=state_dir,
                           serve=cfg.inference.serve, **common, **_signing(cfg, base, state_dir, count))]
    # A simulated fleet shares one disk: atomic renames, but no fsync per device.
    return [
        DeviceSpec(client_id=f"{base}-{i:03d}", data_args={**cfg.data.args, "client": i, "clients": count},
                   state_dir=Path(cfg.agent.state_dir) / f"{base}-{i:03d}", durable=False, **common,
                   **_signing(cfg, f"{base}-{i:03d}", Path(cfg.agent.state_dir) / f"{base}-{i:03d}", count))
        for i in range(count)
    ]


def _signing(cfg: Any, client_id: str, state_dir: Any, count: int | None) -> dict[str, Any]:
    """The device's key (made at the first start, its public key logged for
    enrollment) and the aggregator's it pins, when signing is on."""
    from pathlib import Path

    from fedge.identity import Identity, IdentityError, read_public_key

    ident = cfg.identity
    if ident.signing != "required":
        if count is None or client_id.endswith("-000"):  # once for a simulated fleet
            log.warning("identity.signing = \"off\": devices believe anyone who can publish on the broker")
        return {}
    path = Path(ident.key_file) if ident.key_file and count is None else Path(state_dir) / "device.key"
    try:
        if not path.exists():
            Identity.generate().save(path)
            made = Identity.load(path)
            log.warning("made this device's key pair in %s; enroll it on the aggregator's host: "
                        "fedge enroll --config job.toml %s %s", path, client_id, made.public.to_text())
        return {"identity": Identity.load(path), "aggregator_key": read_public_key(ident.aggregator_key),
                "root_key": read_public_key(ident.root_key) if ident.root_key else None}
    except IdentityError as exc:
        raise UsageError(str(exc)) from None


def _agent_extras(cfg: Any) -> None:
    """What the agent's config asks for is installed: metrics, at once; a
    device that trains and cannot mask its updates is told why it will not
    be chosen for secure-aggregation rounds (it does not offer them)."""
    if cfg.metrics.enabled:
        need_extra("metrics", "metrics.enabled = true")
    if cfg.agent.role != "inference" and not has_extra("secure aggregation"):
        _, dist, extra = EXTRAS["secure aggregation"]
        log.warning("%s is not installed: this device will not be chosen for secure-aggregation rounds "
                    "(pip install 'fedge[%s]')", dist, extra)


def _run_agents(cfg: Any, devices: list[Any], pool_size: int, mode: str, threads: int) -> int:
    from edge_agent.pool import TrainingPool
    from edge_agent.runtime import AgentRuntime

    pool = TrainingPool(size=pool_size, mode=mode, threads=threads, timeout_s=cfg.worker.timeout_s,
                        python=cfg.worker.python)
    runtime = AgentRuntime(devices, cfg.broker, pool, metrics=cfg.metrics)
    _on_signals(runtime.stop)
    runtime.start()
    try:
        runtime.run()
    finally:
        runtime.close()
        pool.close()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from edge_agent.config import AgentConfig
    from fedge import config

    cfg = config.load(args.config, AgentConfig, args.set)  # checked as it loads
    cfg.broker.password()  # an unreadable password file is named now, not after start-up
    _agent_extras(cfg)
    devices = _devices(cfg, None)
    inference = cfg.agent.role == "inference"
    log.info("agent %s for job %s on %s (%s)", devices[0].client_id, cfg.agent.job, cfg.broker.url,
             f"inference only, artifact {cfg.inference.artifact}" if inference else f"worker {cfg.worker.mode}")
    # An inference-only device never trains: no warm PyTorch worker for it.
    return _run_agents(cfg, devices, 1, "per_round" if inference else cfg.worker.mode, cfg.worker.threads)


def cmd_config(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from edge_agent.config import AgentConfig
    from fedge import config

    cls = AggregatorConfig if args.role == "aggregator" else AgentConfig
    sys.stdout.write(config.render_defaults(cls))
    return 0


def round_events(cfg: Any, who: str, key: Any = None, done_grace_s: float = 3.0) -> Iterator[Any]:
    """The job's round records as the aggregator publishes them on its events
    topic, until the job is done or a signal. Each is parsed into a
    ``RoundRecord``; with the aggregator's public ``key``, one it did not
    sign is left out (logged). The job is done when its announcement says
    so: the generator ends once the last round's record is in, or
    ``done_grace_s`` later (a job that ended before we subscribed publishes
    no more records)."""
    import queue as _queue
    import time as _time

    from fedge import messages, wire
    from fedge.identity import IdentityError, check_signed
    from fedge.messages import RoundAnnouncement
    from fedge.mqtt import Inbound, MqttLink
    from fedge.records import RoundRecord
    from fedge.topics import JobTopics

    topics = JobTopics(cfg.job.name)
    events: _queue.Queue[object] = _queue.Queue()
    link = MqttLink(cfg.broker, f"fedge-{who}-{os.getpid()}", events.put,
                    subscriptions=[topics.events, topics.round], persistent=False)
    stopped: list[bool] = []
    _on_signals(lambda: stopped.append(True))
    last_round = 0  # of the newest record
    done: tuple[int, float] | None = None  # (the job's last round, when we learnt it was done)
    link.start()
    try:
        while not stopped:
            if done is not None and (last_round >= done[0] or _time.monotonic() - done[1] >= done_grace_s):
                log.info("job %s is done after round %d", cfg.job.name, done[0])
                return
            try:
                item = events.get(timeout=0.5)
            except _queue.Empty:
                continue
            if not isinstance(item, Inbound) or not item.payload:
                continue
            try:
                env = wire.decode(item.payload)
                if key is not None:
                    check_signed(env, key, "an event" if item.topic == topics.events else "an announcement")
                if item.topic == topics.round:
                    ann = RoundAnnouncement.parse(env)
                    if ann.state == "done" and done is None:
                        done = (ann.round - 1, _time.monotonic())
                    continue
                record = RoundRecord.from_json(messages.parse_event(env))
            except (FedgeError, IdentityError) as exc:  # wire, protocol or record: whatever a broker hands us
                log.warning("ignored %s: %s", "an event" if item.topic == topics.events else "an announcement", exc)
                continue
            last_round = max(last_round, record.round)
            yield record
    finally:
        link.stop()


def cmd_watch(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from fedge import config
    from fedge_cli.table import RoundTable

    cfg = config.load(args.config, AggregatorConfig, args.set)
    table = RoundTable(sys.stdout, privacy=cfg.privacy.mode != "off", buffered=cfg.server.mode == "buffered")
    table.header()
    for record in round_events(cfg, "watch"):
        table.row(record)
    return 0


# --- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge", description="Federated learning for fleets of small devices over MQTT.")
    p.add_argument("--version", action="version", version=f"fedge {__version__}")
    p.add_argument("--log-level", default=None, metavar="LEVEL",
                   help="DEBUG, INFO, WARNING or ERROR (default: INFO for aggregator, agent, fleet and watch, "
                        "WARNING for the other commands)")
    p.add_argument("--log-format", default=None, choices=["text", "json"],
                   help="text (default) or json: one object per line with time, level, logger, message and, where "
                        "a line is about one, round, device, reason and status")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="run a whole federation (broker, aggregator, agents) in one command")
    d.add_argument("--agents", type=int, default=10, help="number of edge agents (default 10)")
    d.add_argument("--rounds", type=int, default=30, help="rounds to run (default 30)")
    d.add_argument("--data", default="digits", choices=["digits", "breast-cancer"],
                   help="built-in data set (default digits)")
    d.add_argument("--broker", default=None, help="use this broker (mqtt://host:port) instead of the embedded one")
    d.add_argument("--protocol", default="3.1.1", choices=["3.1.1", "5"], help="MQTT version (embedded: 3.1.1)")
    d.add_argument("--codec", default=None,
                   help='update codec: a name (int8) or JSON ({"name": "topk", "fraction": 0.05}); default: '
                        "the job default, int2 with zlib")
    d.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha (default 0.5)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the job (initial model, selection) and of the agents' data split (default 0)")
    d.add_argument("--workers", type=int, default=2, help="training worker processes (default 2)")
    d.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    d.add_argument("--state-dir", default=None, help="keep state here instead of a temporary directory")
    d.add_argument("--target-epsilon", type=float, default=None, metavar="E",
                   help="run with client-level differential privacy until epsilon would exceed E (> 0); "
                        "default: no privacy")
    d.add_argument("--secure-aggregation", action="store_true",
                   help="mask every update (SecAgg+) so that the aggregator learns only each round's sum")
    d.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="each selected agent silently drops out of a round with probability P, at a random stage")
    d.add_argument("--signing", default="required", choices=["required", "off"],
                   help="required (default): every agent has its own key, enrolled with the aggregator, and "
                        "all messages are signed; off: nothing is signed (logged)")
    d.add_argument("--mode", default="synchronous", choices=["synchronous", "buffered"],
                   help="synchronous rounds (default), or buffered asynchronous aggregation (FedBuff): half the "
                        "agents train at once, a version every quarter of them, nobody waits for the slowest")
    d.add_argument("--profile", default=None, metavar="NAME",
                   help="run the agents as a simulated fleet with this profile's devices, links and sessions (lab, "
                        "home-wifi, cellular-mixed or a TOML file; default: none, or home-wifi with --mode "
                        "buffered); '' for none")
    d.add_argument("--relays", type=int, default=0, metavar="N",
                   help="a relayed job: N relays (fedge relay), the agents split between their regions; each relay "
                        "runs its region's round and sends the root one sum (default 0: no relays)")
    d.set_defaults(func=cmd_demo, default_level="WARNING")

    for name, func, helptext in (
        ("aggregator", cmd_aggregator, "run the aggregator of a job (beside the broker)"),
        ("agent", cmd_agent, "run the edge agent on this device"),
        ("watch", cmd_watch, "print a job's per-round records as they are published"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", required=name != "watch", default=None, help="TOML config file")
        s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config key (not for secrets)")
        s.set_defaults(func=func, default_level="INFO")

    r = sub.add_parser("relay", help="run one region's relay of a relayed job (beside its broker node or site)")
    r.add_argument("--config", required=True, help="the job's TOML config (the root's: relays.min_relays > 0)")
    r.add_argument("--region", required=True, help="the region's name: its devices set agent.region to it")
    r.add_argument("--state-dir", required=True,
                   help="the relay's own state: its key, checkpoint, and its region's enrolled devices")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (not for secrets)")
    r.set_defaults(func=cmd_relay, default_level="INFO")

    from fedge_cli import simulate

    simulate.add_parser(sub)

    c = sub.add_parser("config", help="print a complete config file with every default, documented")
    c.add_argument("role", choices=["aggregator", "agent"], help="whose config: aggregator or agent")
    c.set_defaults(func=cmd_config, default_level="WARNING")

    from fedge_cli import identity as identity_cli

    identity_cli.add_commands(sub)

    from fedge_cli import data as data_cli

    data_cli.add_commands(sub)

    from fedge_cli import privacy as privacy_cli

    privacy_cli.add_commands(sub)

    from fedge_cli import report as report_cli

    report_cli.add_commands(sub)

    from fedge_cli import status as status_cli

    status_cli.add_commands(sub)

    from export import cli as export_cli

    export_cli.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.log_level or args.default_level, args.log_format)
    from fedge.config import ConfigError
    from fedge.imports import ImportSpecError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, ImportSpecError, FileNotFoundError) as exc:
        print(f"fedge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of our output went away (`fedge demo | head`)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
