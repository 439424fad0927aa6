"""``fedge status``: the fleet of a job, from the broker's retained messages.

It subscribes to the job's retained presence (``status/+``, each device's
own), the aggregator's device records (``device/+``: last seen, rounds,
last receipt, see ``aggregator.fleet``) and the aggregator's presence
(``server``), reads what the broker holds until it goes quiet, and prints
one line per device, or ``--json`` for scripts.

What it shows is checked: every message is parsed into its type (one that
is not is counted and left out), and with the aggregator's public key
(``--aggregator-key``, or the key file of ``--config``'s job when run on the
aggregator's host) the aggregator's records must carry its signature. A
device's own presence is shown as the broker holds it: the broker's ACL
lets only that device write it.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import time
from pathlib import Path
from typing import Any

from fedge.errors import FedgeError

log = logging.getLogger(__name__)


def aggregator_key(text: str | None, cfg: Any) -> Any:
    """The aggregator's public key: ``text`` (a key or a file), else that of
    the job's key file when this user can read it, else None."""
    from fedge.identity import Identity, read_public_key

    if text:
        return read_public_key(text)
    path = Path(cfg.identity.key_file) if cfg.identity.key_file else Path(cfg.job.state_dir) / "aggregator.key"
    try:
        return Identity.load(path).public
    except (OSError, FedgeError, ValueError):
        return None  # not the aggregator's host, or not readable by this user


def collect(cfg: Any, key: Any, wait_s: float, quiet_s: float = 0.7, region: str = "") -> dict[str, Any]:
    """Read the retained messages until ``quiet_s`` pass without one (or
    ``wait_s`` in all): ``{"devices": {id: row}, "aggregator": state,
    "skipped": n, "unverified": n}``. ``region``: a relayed job's region,
    as its relay sees it (without it: the root's view, whose members are
    relays)."""
    from fedge import wire
    from fedge.identity import IdentityError, check_signed
    from fedge.messages import AGGREGATOR, DeviceRecord, ProtocolError, RoundAnnouncement, Status, device_info
    from fedge.mqtt import Inbound, LinkUp, MqttLink
    from fedge.topics import JobTopics

    topics = JobTopics(cfg.job.name, region)
    inbox: queue.Queue[object] = queue.Queue()
    # It gives up with one line of its own, naming why (the link's last_error), rather than log retries.
    link = MqttLink(cfg.broker, f"fedge-status-{id(inbox):x}", inbox.put,
                    subscriptions=[topics.status_filter, topics.device_filter, topics.server, topics.round],
                    persistent=False,
                    report_outages=False)
    presence: dict[str, Any] = {}
    records: dict[str, Any] = {}
    aggregator = "unknown"
    job: dict[str, Any] = {}  # what the retained announcement says
    skipped = unverified = 0
    started = time.monotonic()
    link.start()
    try:
        if not link.wait_connected(min(wait_s, cfg.broker.keepalive_s)):
            why = link.last_error or "no answer yet; check broker.url and the broker's credentials"
            raise ConnectionError(f"cannot reach the broker at {cfg.broker.url}: {why}")
        last = time.monotonic()
        while time.monotonic() - started < wait_s and time.monotonic() - last < quiet_s:
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, LinkUp):
                last = time.monotonic()
                continue
            if not isinstance(item, Inbound) or not item.payload:
                continue
            last = time.monotonic()
            channel, client = topics.parse(item.topic)
            try:
                env = wire.decode(item.payload)
                if channel == "status" and client:
                    status = Status.parse(env)
                    if status.sender != client:
                        raise ProtocolError("malformed", f"presence on {client}'s topic names {status.sender}")
                    presence[client] = status
                elif channel == "device" and client:
                    if key is not None:
                        check_signed(env, key, f"the record of {client}")
                    else:
                        unverified += 1
                    record = DeviceRecord.parse(env)
                    if record.device != client or record.job != cfg.job.name:
                        raise ProtocolError("malformed", f"the record on {client}'s topic is of {record.device}")
                    records[client] = record
                elif channel == "server":
                    status = Status.parse(env)
                    if status.sender == AGGREGATOR:
                        aggregator = status.state
                elif channel == "round":
                    if key is not None:
                        check_signed(env, key, "the announcement")
                    ann = RoundAnnouncement.parse(env)
                    job = {"state": ann.state, "round": ann.round, "attempt": ann.attempt, "mode": ann.mode,
                           "max_staleness": ann.max_staleness if ann.buffered else None}
            except (FedgeError, IdentityError) as exc:
                skipped += 1
                log.warning("left out a message on %s: %s", item.topic, exc)
    finally:
        link.stop()
    now = time.time()
    devices: dict[str, Any] = {}
    for client in sorted(set(presence) | set(records)):
        p, r = presence.get(client), records.get(client)
        online = p.state == "online" if p is not None else bool(r and r.online)
        info = device_info(p.info) if p is not None and p.state == "online" else (r.info if r else {})
        devices[client] = {
            "id": client,
            "role": info.get("role", ""),
            "online": online,
            "last_seen": now if online else (r.last_seen if r and r.last_seen else None),
            "fedge": info.get("fedge", ""),
            "torch": info.get("torch", ""),
            "onnxruntime": info.get("onnxruntime", ""),
            "codecs": info.get("codecs", []),
            "arch": info.get("arch", ""),
            "board": info.get("board", ""),
            "ram_mb": info.get("ram_mb"),
            "cpus": info.get("cpus"),
            "rounds": r.rounds if r else 0,
            "last_receipt": r.last_receipt if r else "",
            "last_round": r.last_round if r else 0,
        }
    return {"job": cfg.job.name, "aggregator": aggregator, "round": job, "devices": devices, "skipped": skipped,
            "unverified": unverified if key is None else 0, "time": now}


def _ago(then: float | None, now: float, online: bool) -> str:
    if online:
        return "now"
    if then is None:
        return "-"
    s = max(0.0, now - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _job_state(r: dict[str, Any]) -> str:
    """What the announcement says: the round (a buffered job's version) and its state."""
    if not r:
        return ""
    if r["mode"] == "buffered":
        what = (f"version {r['round']} being built (buffered; updates up to {r['max_staleness']} versions old)"
                if r["state"] == "open" else f"buffered, {r['state']}")
        return f", {what}"
    if r["state"] == "done":
        return ", job done"
    return f", round {r['round']} {r['state']}"


def print_table(view: dict[str, Any], out: Any = sys.stdout) -> None:
    devices = list(view["devices"].values())
    online = sum(1 for d in devices if d["online"])
    out.write(f"job {view['job']}: aggregator {view['aggregator']}{_job_state(view.get('round') or {})}, "
              f"{online}/{len(devices)} devices online\n")
    cols = ("device", "role", "state", "last seen", "fedge", "arch", "board", "RAM", "cores", "rounds",
            "last receipt")
    rows = [cols]
    for d in devices:
        rows.append((d["id"], d["role"] or "-", "online" if d["online"] else "offline",
                     _ago(d["last_seen"], view["time"], d["online"]), d["fedge"] or "-", d["arch"] or "-",
                     (d["board"] or "-")[:28], f"{d['ram_mb'] / 1024:.1f}G" if d["ram_mb"] else "-",
                     str(d["cpus"] or "-"), str(d["rounds"]),
                     (f"{d['last_receipt']} (round {d['last_round']})" if d["last_receipt"] else "-")[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    if view["skipped"]:
        out.write(f"left out {view['skipped']} message(s) that were not well formed or not signed by the "
                  "aggregator (logged)\n")
    if view["unverified"]:
        out.write(f"{view['unverified']} device record(s) not verified: give --aggregator-key to check the "
                  "aggregator's signature\n")


def cmd_status(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from fedge import config
    from fedge.topics import check_id
    from fedge_cli.main import UsageError

    if not args.wait > 0:
        raise UsageError("--wait must be a positive number of seconds")
    cfg = config.load(args.config, AggregatorConfig, args.set)
    try:
        key = aggregator_key(args.aggregator_key, cfg)
    except FedgeError as exc:
        raise UsageError(f"--aggregator-key: {exc}") from None
    try:
        view = collect(cfg, key, args.wait, region=check_id(args.region, "--region") if args.region else "")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except ConnectionError as exc:
        raise UsageError(f"{exc} ([broker] in {args.config or 'the defaults'})") from None
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print_table(view)
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("status", help="the fleet of a job: each device's state, hardware, software and rounds")
    s.add_argument("--config", default=None, help="the job's TOML config (its [job] name and [broker])")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the job's config (not for secrets)")
    s.add_argument("--aggregator-key", default=None, metavar="KEY",
                   help="the aggregator's public key (ed25519:... or a file) to verify its device records; "
                        "default: the job's key file, when readable here")
    s.add_argument("--region", default="", metavar="NAME",
                   help="a relayed job's region: its devices, as its relay sees them (give --aggregator-key the "
                        "relay's key, or --set job.state_dir=<the relay's state dir>); default: the root's view")
    s.add_argument("--wait", type=float, default=5.0, help="read retained messages for at most this long (s)")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")
    s.set_defaults(func=cmd_status, default_level="WARNING")
