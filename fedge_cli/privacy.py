"""``fedge privacy``: plan a private job before it runs.

``fedge privacy --target-epsilon 3 --rounds 400 --sampling-rate 0.1 --delta
1e-5`` prints the smallest noise multiplier that keeps those rounds within
the budget; ``fedge privacy --config job.toml`` prints what the job's
``[privacy]`` spends: epsilon after a few round counts up to ``job.rounds``
and, with a budget, the last round it allows. Both from dp-accounting, the
accountant the aggregator uses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def cmd_privacy(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from aggregator.privacy import ACCOUNTANTS, PrivacySpec, epsilon, noise_for_budget, rounds_within
    from fedge import config
    from fedge_cli.main import UsageError

    if args.accountant is not None and args.accountant not in ACCOUNTANTS:
        raise UsageError(f"--accountant {args.accountant!r} is not known; use one of {', '.join(ACCOUNTANTS)}")
    if args.config:
        # The flags given beside it change the job's keys as --set would (and are checked with them).
        given = {"privacy.accountant": args.accountant, "privacy.target_epsilon": args.target_epsilon,
                 "job.rounds": args.rounds, "privacy.sampling_rate": args.sampling_rate, "privacy.delta": args.delta}
        flags = [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
                 for key, value in given.items() if value is not None]
        cfg = config.load(args.config, AggregatorConfig, [*args.set, *flags])
        if cfg.privacy.mode == "off":
            raise UsageError(f"{args.config} has [privacy] mode = \"off\": nothing to account; set mode to "
                             "central or distributed")
        p = cfg.privacy
        spec = PrivacySpec(p.noise_multiplier, p.sampling_rate, p.delta, p.accountant)
        rounds, target = cfg.job.rounds, p.target_epsilon
    else:
        if args.target_epsilon is None or args.rounds is None:
            raise UsageError("give --config job.toml, or --target-epsilon E and --rounds R (with --sampling-rate "
                             "and --delta) to get the noise multiplier")
        accountant = args.accountant or "rdp"
        q = 0.1 if args.sampling_rate is None else args.sampling_rate
        delta = 1e-5 if args.delta is None else args.delta
        if args.rounds < 1 or not (math.isfinite(args.target_epsilon) and args.target_epsilon > 0):
            raise UsageError("--rounds must be at least 1 and --target-epsilon positive")
        if not 0 < q <= 1 or not 0 < delta < 1:
            raise UsageError(f"--sampling-rate {q:g} must be in (0, 1] and --delta {delta:g} in (0, 1)")
        try:
            z = noise_for_budget(args.target_epsilon, args.rounds, q, delta, accountant)
            spec = PrivacySpec(z, q, delta, accountant)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        rounds, target = args.rounds, args.target_epsilon
    checkpoints = sorted({max(1, rounds * k // 4) for k in (1, 2, 3, 4)})
    table = [(r, epsilon(spec, r)) for r in checkpoints]
    out: dict[str, Any] = {
        "noise_multiplier": round(spec.noise_multiplier, 4), "sampling_rate": spec.sampling_rate,
        "delta": spec.delta, "accountant": spec.accountant, "rounds": rounds,
        "epsilon": {str(r): round(e, 4) for r, e in table},
    }
    if target:
        out["target_epsilon"] = target
        out["rounds_within_target"] = rounds_within(spec, target)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"noise_multiplier {spec.noise_multiplier:.4g}, sampling_rate {spec.sampling_rate:g} (Poisson), "
          f"delta {spec.delta:g}, accountant {spec.accountant}")
    for r, e in table:
        print(f"  after {r:>6} rounds: epsilon {e:.3f}")
    if target:
        print(f"the budget (epsilon {target:g}) allows {out['rounds_within_target']} rounds", file=sys.stdout)
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("privacy", help="plan a private job: the noise for a budget, or what a job's [privacy] spends")
    s.add_argument("--config", default=None,
                   help="a job's TOML config: account its [privacy] (the flags below, given, override its keys)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="with --config: override a config key")
    s.add_argument("--target-epsilon", type=float, default=None, metavar="E",
                   help="the budget: the noise multiplier that keeps --rounds within it (with --config: "
                        "privacy.target_epsilon)")
    s.add_argument("--rounds", type=int, default=None, metavar="R", help="rounds to run (with --config: job.rounds)")
    s.add_argument("--sampling-rate", type=float, default=None, metavar="Q",
                   help="Poisson rate (default 0.1; with --config: privacy.sampling_rate)")
    s.add_argument("--delta", type=float, default=None,
                   help="the delta of (epsilon, delta) (default 1e-5; with --config: privacy.delta)")
    s.add_argument("--accountant", default=None,
                   help="rdp (default) or pld (tighter, slower); with --config: privacy.accountant")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_privacy, default_level="WARNING")
