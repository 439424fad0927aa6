"""``fedge keys``, ``fedge enroll``, ``fedge revoke`` and ``fedge devices``:
the operator's side of device identity.

On a device: ``fedge keys new --out /etc/fedge/device.key`` makes its key
pair (the private key never leaves that file) and prints the public key. On
the aggregator's host: ``fedge enroll --config job.toml dev-17 ed25519:...``
lets that device take part; ``fedge revoke`` stops it on its next message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedge.errors import FedgeError


def _fail(exc: FedgeError) -> Any:
    from fedge_cli.main import UsageError

    raise UsageError(str(exc)) from None


def cmd_keys(args: argparse.Namespace) -> int:
    from fedge.identity import Identity, IdentityError

    try:
        if args.action == "new":
            me = Identity.generate()
            me.save(Path(args.out))
            pub = Path(args.out).with_suffix(".pub")
            if not pub.exists():
                pub.write_text(me.public.to_text() + "\n")
            print(me.public.to_text())
            print(f"private key: {args.out} (mode 0600, never leaves this machine); public key: {pub}",
                  file=sys.stderr)
        elif args.action == "rotate":
            _rotate(args)
        else:
            print(Identity.load(Path(_shown_key(args))).public.to_text())
    except IdentityError as exc:
        _fail(exc)
    return 0


def _shown_key(args: argparse.Namespace) -> str:
    """``fedge keys show FILE``; ``--key FILE``, the old form, still works,
    with a note on stderr."""
    from fedge_cli.main import UsageError

    if args.key is not None:
        print("fedge keys show: --key is deprecated and will go: use `fedge keys show FILE`", file=sys.stderr)
        if args.file is not None and args.file != args.key:
            raise UsageError(f"two key files, {args.file} and --key {args.key}: give one, `fedge keys show FILE`")
    path = args.file or args.key
    if not path:
        raise UsageError("which key? `fedge keys show FILE` prints the public key of the private key file FILE")
    return str(path)


def _rotate(args: argparse.Namespace) -> None:
    """Make the aggregator's next key beside its current one; the aggregator
    takes it at its next start, signed over by the current key."""
    from aggregator.config import AggregatorConfig
    from fedge import config
    from fedge.identity import Identity, next_key_path

    cfg = config.load(args.config, AggregatorConfig, args.set)
    path = Path(cfg.identity.key_file) if cfg.identity.key_file else Path(cfg.job.state_dir) / "aggregator.key"
    current = Identity.load(path)  # a rotation needs the current key to sign the handover
    nxt = Identity.generate()
    nxt.save(next_key_path(path))
    print(nxt.public.to_text())
    print(f"made the aggregator's next key in {next_key_path(path)}; restart the aggregator: the current key "
          f"({current.public.fingerprint}) signs the handover, and devices that pinned it follow on their own",
          file=sys.stderr)


def _registry(config_path: str, overrides: list[str], writes: bool = False) -> Any:
    from aggregator.config import AggregatorConfig
    from aggregator.registry import Registry
    from fedge import config
    from fedge.files import writable_dir

    cfg = config.load(config_path, AggregatorConfig, overrides)
    if writes:  # one line naming job.state_dir, not a traceback from the lock file
        writable_dir(cfg.job.state_dir, "job.state_dir")
    return Registry(Path(cfg.job.state_dir))


def read_fleet(path: str) -> list[tuple[str, Any]]:
    """``fedge enroll --from FILE``: one device a line, ``<id> <key>`` (the
    key as ``fedge keys`` prints it, or a ``.pub`` file), blank lines and
    ``#`` comments skipped; ``-`` reads standard input. Raises
    ``IdentityError`` naming the line of the first that is not."""
    from fedge.identity import IdentityError, read_public_key

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read the device list {path}: {exc}") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise IdentityError(f"{path}:{number}: expected '<device id> <public key>', got {line.strip()!r}")
        try:
            out.append((words[0], read_public_key(words[1])))
        except IdentityError as exc:
            raise IdentityError(f"{path}:{number}: {exc}") from None
    if not out:
        raise IdentityError(f"{path} lists no devices: one '<device id> <public key>' a line")
    return out


def _enroll_fleet(args: argparse.Namespace) -> int:
    from aggregator.registry import RegistryError
    from fedge.identity import IdentityError

    try:
        fleet = read_fleet(args.from_file)
        enrolled, unchanged = _registry(args.config, args.set, writes=True).enroll_many(fleet, replace=args.replace)
    except (IdentityError, RegistryError) as exc:
        _fail(exc)
    print(f"enrolled {len(enrolled)} devices" + (f"; {len(unchanged)} already enrolled with the same key, unchanged"
                                                 if unchanged else ""))
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from aggregator.registry import RegistryError
    from fedge.identity import IdentityError, read_public_key
    from fedge_cli.main import UsageError

    if args.from_file is not None:
        if args.device is not None or args.key is not None:
            raise UsageError("give either a device and its key or --from FILE, not both")
        return _enroll_fleet(args)
    if args.device is None or args.key is None:
        raise UsageError("give a device id and its public key (fedge enroll --config job.toml ID KEY), or a file "
                         "of them with --from FILE")
    try:
        key = read_public_key(args.key)
        registry = _registry(args.config, args.set, writes=True)
        if registry.key_of(args.device) == key:  # enrolled, active, with this very key: nothing to do
            print(f"{args.device} is already enrolled with this key ({key.fingerprint}); nothing changed")
            return 0
        dev = registry.enroll(args.device, key, replace=args.replace)
    except (IdentityError, RegistryError) as exc:
        _fail(exc)
    print(f"enrolled {dev.id} with key {dev.key.fingerprint}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from aggregator.registry import RegistryError

    try:
        dev = _registry(args.config, args.set, writes=True).revoke(args.device)
    except RegistryError as exc:
        _fail(exc)
    print(f"revoked {dev.id} (key {dev.key.fingerprint}); the aggregator refuses it from its next message")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from aggregator.registry import RegistryError

    try:
        devices = sorted(_registry(args.config, args.set).devices.values(), key=lambda d: d.id)
    except RegistryError as exc:
        _fail(exc)
    if args.json:
        print(json.dumps([{"id": d.id, "key": d.key.to_text(), **d.to_json()} for d in devices], indent=2))
        return 0
    print(f"{'device':<24} {'state':<8} {'key':<16} enrolled")
    for d in devices:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.enrolled_at))
        print(f"{d.id:<24} {'active' if d.active else 'revoked':<8} {d.key.fingerprint:<16} {when}")
    return 0


def provision(state_dir: Path, device_ids: list[str], key_dir: Path, key_file: str = "") -> tuple[Any, dict[str, Any]]:
    """Signing for a fleet simulated on one host (``fedge demo``, benchmarks,
    tests): the aggregator's key (made where its service looks for it, if
    missing: ``key_file``, or aggregator.key in the job's ``state_dir``) and
    a key per device (``key_dir/<id>.key``, made if missing), each enrolled
    in the job's registry. Returns (the aggregator's public
    key, device id -> Identity). A real fleet does this by hand: ``fedge keys
    new`` on each device, ``fedge enroll`` on the aggregator's host."""
    from aggregator.registry import Registry
    from fedge.identity import Identity

    state = Path(state_dir)
    agg_path = Path(key_file) if key_file else state / "aggregator.key"
    if not agg_path.exists():
        Identity.generate().save(agg_path)
    registry = Registry(state)
    identities: dict[str, Any] = {}
    for device in device_ids:
        path = key_dir / f"{device}.key"
        if not path.exists():
            Identity.generate().save(path)
        identities[device] = Identity.load(path)
    registry.enroll_many([(d, identities[d].public) for d in device_ids], replace=True)  # one write for the fleet
    return Identity.load(agg_path).public, identities


def add_commands(sub: Any) -> None:
    k = sub.add_parser("keys", help="make a device's (or the aggregator's) key pair, or show a public key")
    kk = k.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = kk.add_parser("new", help="make a key pair: the private key file (0600) and NAME.pub")
    new.add_argument("--out", required=True, help="private key file to create (never overwritten)")
    show = kk.add_parser("show", help="print the public key of a private key file")
    show.add_argument("file", nargs="?", default=None, metavar="FILE", help="the private key file")
    # The old form, `fedge keys show --key FILE`: kept working, hidden, noted as deprecated.
    show.add_argument("--key", default=None, help=argparse.SUPPRESS)
    rot = kk.add_parser("rotate", help="make the aggregator's next key (taken at its next start, signed over by "
                                       "the current one)")
    rot.add_argument("--config", required=True, help="the job's TOML config")
    rot.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a key of the job's config (not for secrets)")
    k.set_defaults(func=cmd_keys, default_level="WARNING")

    for name, func, helptext in (
        ("enroll", cmd_enroll, "let a device take part in a job, with its public key"),
        ("revoke", cmd_revoke, "stop a device: refused from its next message"),
        ("devices", cmd_devices, "list the devices enrolled with a job"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", required=True, help="the job's TOML config (its state directory holds them)")
        s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a key of the job's config (not for secrets)")
        if name == "revoke":
            s.add_argument("device", help="device id (its agent.id)")
        if name == "enroll":
            s.add_argument("device", nargs="?", default=None, help="device id (its agent.id)")
            s.add_argument("key", nargs="?", default=None,
                           help="its public key (ed25519:...) or a file holding it (NAME.pub)")
            s.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                           help="enroll a fleet in one write: one '<device id> <public key>' a line (# comments), "
                                "all or none; - reads standard input")
            s.add_argument("--replace", action="store_true",
                           help="give an enrolled (or revoked) device another key; enrolling it again with the "
                                "key it has needs no flag and changes nothing")
        if name == "devices":
            s.add_argument("--json", action="store_true", help="print the devices as JSON")
        s.set_defaults(func=func, default_level="WARNING")
