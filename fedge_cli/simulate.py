"""``fedge simulate``: a fleet of simulated devices against a real broker.

The parent checks everything (flags, the profile, descriptors, the agent
config), makes the devices' keys in bulk (``<state_dir>/<id>/device.key``)
and writes the enrollment file the aggregator's operator passes to
``fedge enroll --from``, then runs the fleet in ``--processes`` child
processes (each a slice of the devices on one MQTT loop, with one training
worker) and, when they are done, writes their summaries together.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fedge.sim")

# A part of the fleet stops within this many seconds of being told to (its
# links' and training pool's own timeouts add up to well under it).
STOP_WITHIN_S = 60.0


def _usage_error(message: str) -> Exception:
    from fedge_cli.main import UsageError

    return UsageError(message)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("simulate", aliases=["fleet"],
                       help="simulate N devices, each with its own connection, on real brokers (tests, benchmarks; "
                            "also: fedge fleet)")
    s.add_argument("--config", default=None, metavar="FILE", help="agent TOML config (agent.id is the id prefix)")
    s.add_argument("--devices", "--agents", dest="devices", type=int, required=True, metavar="N",
                   help="number of simulated devices, each with its own MQTT connection, key and state")
    s.add_argument("--profile", default="lab", metavar="NAME|FILE",
                   help="fleet profile: a preset (lab, home-wifi, cellular-mixed) or a TOML file (default lab)")
    s.add_argument("--time-scale", type=float, default=1.0, metavar="K",
                   help="run fleet time K times faster than wall time (rates x K; latencies, training times "
                        "and sessions / K; default 1)")
    s.add_argument("--processes", type=int, default=0, metavar="N",
                   help="processes to run the fleet in, each with its own training worker (default: one per core)")
    s.add_argument("--seed", type=int, default=0, help="seed of the devices' conditions and events (default 0)")
    s.add_argument("--summary", default=None, metavar="FILE", help="write what happened as JSON when it stops")
    s.add_argument("--show-profile", action="store_true", help="print the profile (its TOML text) and exit")
    s.add_argument("--make-keys", action="store_true",
                   help="only make the devices' keys and the file to enroll them with (fedge enroll --from), "
                        "then exit")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    s.add_argument("--part", default=None, help=argparse.SUPPRESS)  # i/P: a child's slice
    s.set_defaults(func=cmd_simulate, default_level="INFO")


def _check(args: argparse.Namespace) -> None:
    from fedge_cli.main import _check_flag

    if args.devices < 1:
        raise _usage_error(f"--devices {args.devices} is out of range: use at least 1")
    _check_flag("--time-scale", args.time_scale, args.time_scale > 0,
                "a number > 0 (1: real time; 60: an hour of fleet time a minute)")
    _check_flag("--processes", args.processes, args.processes >= 0, "0 (one per core) or more")
    _check_flag("--seed", args.seed, args.seed >= 0, "an integer >= 0")


def _profile(text: str) -> Any:
    from edge_agent.sim.profiles import ProfileError, load

    try:
        return load(text)
    except ProfileError as exc:
        raise _usage_error(f"--profile {text}: {exc}") from None


def device_ids(base: str, n: int) -> list[str]:
    width = max(3, len(str(n - 1)))
    return [f"{base}-{i:0{width}d}" for i in range(n)]


def cmd_simulate(args: argparse.Namespace) -> int:
    from edge_agent.config import AgentConfig
    from fedge import config
    from fedge_cli.main import _agent_extras

    _check(args)
    processes = max(1, min(args.processes or os.cpu_count() or 1, args.devices))
    if args.part is None:  # before anything else: nothing starts that cannot finish
        _check_descriptors(math.ceil(args.devices / processes), processes)
    profile = _profile(args.profile)
    if args.show_profile:
        from edge_agent.sim.profiles import PRESETS

        sys.stdout.write(PRESETS[args.profile] if args.profile in PRESETS else Path(args.profile).read_text())
        return 0
    cfg = config.load(args.config, AgentConfig, args.set)  # checked as it loads
    if cfg.agent.role != "trainer":
        raise _usage_error(f"agent.role = \"{cfg.agent.role}\": fedge simulate runs devices that train; "
                         "set agent.role = \"trainer\"")
    cfg.broker.password()  # an unreadable password file is named now, not after start-up
    if args.part is not None:
        return _run_part(args, cfg, profile, processes)
    _agent_extras(cfg)
    ids = device_ids(cfg.client_id(), args.devices)
    enroll = _make_keys(cfg, ids)
    if args.make_keys:
        return 0
    return _run_parts(args, processes, enroll)


def _check_descriptors(per_process: int, processes: int) -> None:
    from fedge.mqtt_loop import DescriptorLimitError, ensure_descriptors

    try:
        ensure_descriptors(per_process)
    except DescriptorLimitError as exc:
        raise _usage_error(f"--devices with --processes {processes}: {exc}") from None


def _make_keys(cfg: Any, ids: list[str]) -> Path | None:
    """Each device's key in its state directory (made once; kept across
    runs), and the file of ids and public keys to enroll them in bulk."""
    from fedge.files import atomic_write, writable_dir
    from fedge.identity import Identity, IdentityError

    writable_dir(cfg.agent.state_dir, "agent.state_dir")
    if cfg.identity.signing != "required":
        log.warning("identity.signing = \"off\": devices believe anyone who can publish on the broker")
        return None
    root = Path(cfg.agent.state_dir)
    lines = []
    made = 0
    try:
        for cid in ids:
            path = root / cid / "device.key"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Identity.generate().save(path)
                made += 1
            lines.append(f"{cid} {Identity.load(path).public.to_text()}\n")
    except IdentityError as exc:
        raise _usage_error(str(exc)) from None
    enroll = root / "fleet-keys.txt"
    atomic_write(enroll, "".join(lines).encode(), False)
    log.info("%d device keys in %s (%d made now); enroll them on the aggregator's host: "
             "fedge enroll --config job.toml --from %s", len(ids), root, made, enroll)
    return enroll


def _run_parts(args: argparse.Namespace, processes: int, enroll: Path | None) -> int:
    """The children, one per slice; signals go to all of them."""
    argv = [a for a in sys.argv[1:]]
    tmp = Path(tempfile.mkdtemp(prefix="fedge-simulate-"))
    children = []
    for i in range(processes):
        summary = tmp / f"part-{i}.json"
        child = [sys.executable, "-m", "fedge_cli", *_without(argv, "--summary"), "--part", f"{i}/{processes}",
                 "--summary", str(summary)]
        children.append((subprocess.Popen(child), summary))
    log.info("simulated fleet of %d devices in %d processes", args.devices, processes)

    def forward(signum: int, frame: Any) -> None:
        # The children stop within STOP_WITHIN_S; this process, a little after them.
        faulthandler.dump_traceback_later(STOP_WITHIN_S + 30, exit=True)
        for proc, _ in children:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [proc.wait() for proc, _ in children]
    parts = []
    for _, path in children:
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            parts.append(None)
    if args.summary:
        from fedge.files import atomic_write

        atomic_write(Path(args.summary), (json.dumps(merge(parts), indent=2, sort_keys=True) + "\n").encode(), False)
    failed = [i for i, code in enumerate(codes) if code not in (0, -signal.SIGTERM, -signal.SIGINT)]
    if failed:
        log.error("simulation processes %s exited with codes %s", failed, [codes[i] for i in failed])
        return 1
    return 0


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def merge(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The processes' summaries as one: counts summed; a missing part is said."""
    out: dict[str, Any] = {"processes": len(parts), "processes_without_summary": sum(p is None for p in parts)}
    totals: dict[str, Any] = {}
    for p in parts:
        if p is None:
            continue
        for key, value in p.items():
            if isinstance(value, bool):
                continue
            if key == "wall_s" and isinstance(value, (int, float)):
                totals[key] = max(totals.get(key, 0), value)  # the processes ran side by side
            elif isinstance(value, (int, float)) and key != "time_scale":
                totals[key] = totals.get(key, 0) + value
            elif isinstance(value, dict):
                d = totals.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        d[k] = d.get(k, 0) + v
            else:
                totals.setdefault(key, value)
    out.update(totals)
    return out


def _run_part(args: argparse.Namespace, cfg: Any, profile: Any, processes: int) -> int:
    from edge_agent import capabilities
    from edge_agent.pool import TrainingPool
    from edge_agent.runtime import DeviceSpec
    from edge_agent.sim.fleet import SimulatedFleet, write_summary
    from fedge.identity import Identity, IdentityError, read_public_key
    from fedge.mqtt_loop import MqttLoop
    from fedge_cli.main import _on_signals

    try:
        i, p = (int(x) for x in args.part.split("/"))
    except ValueError:
        raise _usage_error(f"--part {args.part!r}: use i/P") from None
    n = args.devices
    lo, hi = i * n // p, (i + 1) * n // p
    ids = device_ids(cfg.client_id(), n)
    conditions = profile.devices(n, args.seed)
    info = capabilities.describe("trainer")  # the same host for every device of the slice: asked once
    root = Path(cfg.agent.state_dir)
    signing = cfg.identity.signing == "required"
    try:
        aggregator_key = read_public_key(cfg.identity.aggregator_key) if signing else None
        root_key = read_public_key(cfg.identity.root_key) if signing and cfg.identity.root_key else None
        specs = [
            DeviceSpec(client_id=ids[k], job=cfg.agent.job, region=cfg.agent.region,
                       receipts_qos=cfg.agent.receipts_qos, data=cfg.data.factory,
                       data_args={**cfg.data.args, "client": k, "clients": n}, state_dir=root / ids[k],
                       accepted_model=cfg.agent.model, max_model_bytes=cfg.agent.max_model_bytes,
                       resend_after_s=cfg.agent.resend_after_s, downlink=cfg.agent.downlink,
                       model_wait_s=cfg.agent.model_wait_s, info=info, durable=False,
                       identity=Identity.load(root / ids[k] / "device.key") if signing else None,
                       aggregator_key=aggregator_key, root_key=root_key)
            for k in range(lo, hi)
        ]
    except IdentityError as exc:
        raise _usage_error(str(exc)) from None
    loop = MqttLoop(name=f"fedge-sim-{i}")
    pool = TrainingPool(size=1, mode="warm", threads=cfg.worker.threads or 1, timeout_s=cfg.worker.timeout_s,
                        python=cfg.worker.python)
    fleet = SimulatedFleet(specs, {s.client_id: conditions[lo + k] for k, s in enumerate(specs)}, cfg.broker, pool,
                           profile, loop=loop, time_scale=args.time_scale, seed=args.seed,
                           shared_files=root / "shared" / f"part-{i}")

    def stop() -> None:
        # Stopping is bounded: every wait in it has a timeout, and should one
        # not hold (or the loop not return), every thread's stack goes to the
        # log and the process ends (exit 1) rather than outlive whoever is
        # waiting for it.
        faulthandler.dump_traceback_later(STOP_WITHIN_S, exit=True)
        fleet.stop()

    _on_signals(stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # every thread's stack on demand, the run goes on
    started = time.monotonic()
    fleet.start()
    try:
        fleet.run()
    finally:
        fleet.close()
        pool.close()
        if args.summary:
            summary = fleet.summary()
            summary["wall_s"] = round(time.monotonic() - started, 3)
            summary["profile"] = profile.name
            write_summary(Path(args.summary), summary)
        faulthandler.cancel_dump_traceback_later()
    return 0
