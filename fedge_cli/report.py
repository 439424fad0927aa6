"""``fedge report``: a job's progress as a PNG and a self-contained HTML page.

Reads the round records of a job: its state directory's ``rounds.jsonl``
(``--state-dir``, or the ``job.state_dir`` of ``--config``), or, with
``--follow``, the events topic the aggregator publishes on, rewriting the
report after each round until the job's last round (or Ctrl-C). Every
record is parsed into a ``RoundRecord`` (the same boundary ``fedge watch``
uses); a line or event that is not one is counted and skipped.

The picture: accuracy and held-out loss per round (training loss beside
it), participation (selected, responded, declined, late, rejected), uplink
and downlink bytes per round and cumulative, round duration (failed rounds
in red), and epsilon when the job is private. Bytes are the aggregator's
count, as its records carry them: up, the update messages it received;
down, what it published (each model message once, the announcement once per
online device), not every device's copy (``fedge demo`` measures those on
its agents and names them so). The HTML page embeds the
picture as a data URI, with a summary and a per-round table: one file that
opens anywhere, with nothing fetched.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from fedge.errors import FedgeError
from fedge.records import RoundRecord

log = logging.getLogger(__name__)
# What the records' bytes_up and bytes_down count (the aggregator's side; see fedge_cli.table).
UP_LABEL = "update messages the aggregator received"
DOWN_LABEL = "published: each model message once, the announcement once per online device"
DEMO_AGGREGATOR = "aggregator"  # where `fedge demo --state-dir D` keeps its aggregator's state: D/aggregator


# --- reading -------------------------------------------------------------------


def read_records(path: Path) -> tuple[list[RoundRecord], int]:
    """The records of ``rounds.jsonl`` (the last one of each round), and how
    many lines were not records."""
    by_round: dict[int, RoundRecord] = {}
    bad = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = RoundRecord.from_json(json.loads(raw))
            except (ValueError, FedgeError):  # a torn last line, or not a record
                bad += 1
                continue
            by_round[record.round] = record
    return [by_round[r] for r in sorted(by_round)], bad


def _epsilon(r: RoundRecord) -> float | None:
    eps = r.extra.get("epsilon")
    return float(eps) if isinstance(eps, (int, float)) and math.isfinite(eps) else None


def _buffered(r: RoundRecord) -> dict[str, Any] | None:
    """A buffered version's figures (``aggregator.modes.buffered``), if it is one."""
    b = r.extra.get("buffered")
    return b if isinstance(b, dict) else None


def staleness_counts(records: list[RoundRecord]) -> dict[int, int]:
    """Every folded update of a buffered job's versions, by staleness."""
    counts: dict[int, int] = {}
    for r in records:
        b = _buffered(r) or {}
        for s, n in (b.get("staleness") or {}).items():
            with contextlib.suppress(TypeError, ValueError):
                counts[int(s)] = counts.get(int(s), 0) + int(n)
    return dict(sorted(counts.items()))


def summarize(records: list[RoundRecord], job: str) -> dict[str, Any]:
    evaluated = [r for r in records if r.accuracy is not None]
    eps = [e for e in (_epsilon(r) for r in records) if e is not None]
    stale = staleness_counts(records)
    folded = sum(stale.values())
    buffered = {"mode": "buffered", "staleness": stale,
                "staleness_mean": round(sum(s * n for s, n in stale.items()) / folded, 3) if folded else None,
                "staleness_max": max(stale) if stale else None} if any(_buffered(r) for r in records) else {}
    return {
        "job": job,
        "rounds": len(records),
        "first_round": records[0].round, "last_round": records[-1].round,
        "failed_rounds": sum(1 for r in records if r.status != "ok"),
        "final_accuracy": evaluated[-1].accuracy if evaluated else None,
        "best_accuracy": max(r.accuracy for r in evaluated if r.accuracy is not None) if evaluated else None,
        "updates_folded": sum(r.clients for r in records),
        "bytes_up": sum(r.bytes_up for r in records),
        "bytes_down": sum(r.bytes_down for r in records),
        "median_round_seconds": statistics.median(r.seconds for r in records),
        "epsilon": eps[-1] if eps else None,
        **buffered,
    }


# --- drawing -------------------------------------------------------------------


def render_png(records: list[RoundRecord], job: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display: a service host, a CI runner
    import matplotlib.pyplot as plt

    rounds = [r.round for r in records]
    private = any(_epsilon(r) is not None for r in records)
    buffered = any(_buffered(r) for r in records)
    rows = 3 + private + buffered
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.4 * rows), constrained_layout=True)
    fig.suptitle(f"fedge job {job}: rounds {rounds[0]}-{rounds[-1]}", fontsize=14)

    ax = axes[0][0]
    ev = [(r.round, r.accuracy) for r in records if r.accuracy is not None]
    if ev:
        ax.plot([x for x, _ in ev], [100 * y for _, y in ev], marker="o", markersize=3, color="tab:blue")
        ax.set_ylabel("accuracy (%)")
    else:
        ax.text(0.5, 0.5, "no evaluation ([evaluate] data is not set)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("held-out accuracy")

    ax = axes[0][1]
    lo = [(r.round, r.loss) for r in records if r.loss is not None and math.isfinite(r.loss)]
    tl = [(r.round, r.train_loss) for r in records if r.train_loss is not None and math.isfinite(r.train_loss)]
    if lo:
        ax.plot([x for x, _ in lo], [y for _, y in lo], marker="o", markersize=3, label="held-out")
    if tl:
        ax.plot([x for x, _ in tl], [y for _, y in tl], marker=".", markersize=3, label="training (devices)")
    if lo or tl:
        ax.legend(loc="upper right")
    ax.set_title("loss")

    ax = axes[1][0]
    responded = [r.clients for r in records]
    declined = [r.declined for r in records]
    late = [r.late for r in records]
    rejected = [sum(r.rejected.values()) for r in records]
    bottom = [0.0] * len(records)
    for values, label, color in ((responded, "responded", "tab:green"), (declined, "declined", "tab:orange"),
                                 (late, "late", "tab:purple"), (rejected, "rejected", "tab:red")):
        if any(values):
            ax.bar(rounds, values, bottom=bottom, label=label, color=color, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    selected = [r.selected for r in records]
    if any(selected):  # a buffered version selects nobody
        ax.scatter(rounds, selected, marker="_", s=300, color="black", label="selected", zorder=3)
    ax.set_ylim(0, 1.35 * max([*selected, *bottom, 1]))
    ax.set_ylabel("devices")
    ax.set_title("participation")
    ax.legend(loc="upper center", fontsize=8, ncol=5)

    ax = axes[1][1]
    width = 0.4
    ax.bar([x - width / 2 for x in rounds], [r.bytes_up / 1024 for r in records], width, label=UP_LABEL)
    ax.bar([x + width / 2 for x in rounds], [r.bytes_down / 1024 for r in records], width, label=DOWN_LABEL)
    ax.set_ylabel("KiB")
    ax.set_title("bytes per round, as the aggregator counts them")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[2][0]
    up = down = 0
    cum_up, cum_down = [], []
    for r in records:
        up += r.bytes_up
        down += r.bytes_down
        cum_up.append(up / 2**20)
        cum_down.append(down / 2**20)
    ax.plot(rounds, cum_up, label=UP_LABEL)
    ax.plot(rounds, cum_down, label=DOWN_LABEL)
    ax.set_ylabel("MiB")
    ax.set_title("bytes, cumulative, as the aggregator counts them")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2][1]
    ax.bar(rounds, [r.seconds for r in records], color=["tab:blue" if r.status == "ok" else "tab:red"
                                                        for r in records], width=0.8)
    ax.set_ylabel("seconds")
    ax.set_title("round duration (failed rounds in red)")

    if private:
        ax = axes[3][0]
        pts = [(r.round, e) for r in records if (e := _epsilon(r)) is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], color="tab:red", label="epsilon (job)")
        part = [(r.round, float(r.extra["epsilon_participant"])) for r in records
                if isinstance(r.extra.get("epsilon_participant"), (int, float))]
        if part:
            ax.plot([x for x, _ in part], [y for _, y in part], color="tab:gray", linestyle="--",
                    label="epsilon (worst device, no secret sampling)")
        ax.set_title("privacy spent")
        ax.legend(loc="upper left", fontsize=8)
        axes[3][1].axis("off")

    if buffered:
        _staleness_row(axes[3 + private], records)

    for row in axes:
        for a in row:
            if a.axison:
                a.set_xlabel("round")
                a.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _staleness_row(row: Any, records: list[RoundRecord]) -> None:
    """A buffered job's staleness: of every folded update, and per version."""
    ax = row[0]
    counts = staleness_counts(records)
    ax.bar(list(counts), list(counts.values()), color="tab:purple", width=0.8)
    ax.set_ylabel("updates")
    ax.set_title("staleness of the folded updates (versions behind)")
    ax = row[1]
    pts = [(r.round, b["staleness_mean"], b.get("staleness_max")) for r in records
           if (b := _buffered(r)) is not None and b.get("staleness_mean") is not None]
    ax.plot([x for x, _, _ in pts], [m for _, m, _ in pts], color="tab:purple", label="mean")
    ax.plot([x for x, _, _ in pts], [m for _, _, m in pts], color="tab:gray", linestyle="--", label="largest")
    ax.set_title("staleness per version")
    ax.legend(loc="upper left", fontsize=8)


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def render_html(records: list[RoundRecord], summary: dict[str, Any], png: bytes) -> str:
    e = html.escape
    s = summary
    facts = [
        ("rounds", f"{s['rounds']} ({s['first_round']}-{s['last_round']}), {s['failed_rounds']} failed"),
        ("final accuracy", _fmt(None if s["final_accuracy"] is None else 100 * s["final_accuracy"], ".2f") + " %"),
        ("best accuracy", _fmt(None if s["best_accuracy"] is None else 100 * s["best_accuracy"], ".2f") + " %"),
        ("updates folded", str(s["updates_folded"])),
        (f"uplink: {UP_LABEL}", f"{s['bytes_up'] / 2**20:.2f} MiB"),
        (f"downlink: {DOWN_LABEL}", f"{s['bytes_down'] / 2**20:.2f} MiB"),
        ("median round", f"{s['median_round_seconds']:.3f} s"),
    ]
    if s["epsilon"] is not None:
        facts.append(("epsilon spent", f"{s['epsilon']:.3f}"))
    if s.get("mode") == "buffered":
        facts.append(("mode", "buffered asynchronous aggregation: rounds are model versions"))
        facts.append(("staleness", f"mean {_fmt(s['staleness_mean'])}, largest {_fmt(s['staleness_max'])} "
                                   "versions behind"))
    head = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    cols = ("round", "status", "selected", "responded", "declined", "late", "rejected", "accuracy", "loss",
            "up KiB (updates received)", "down KiB (published)", "seconds", "epsilon")
    rows = []
    for r in records:
        cells = (r.round, r.status + (f" ({r.failure})" if r.failure else ""), r.selected, r.clients, r.declined,
                 r.late, sum(r.rejected.values()), _fmt(r.accuracy, ".4f"), _fmt(r.loss, ".4f"),
                 f"{r.bytes_up / 1024:.1f}", f"{r.bytes_down / 1024:.1f}", f"{r.seconds:.3f}",
                 _fmt(_epsilon(r), ".3f"))
        cls = "" if r.status == "ok" else ' class="failed"'
        rows.append(f"<tr{cls}>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedge job {e(s['job'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f4f4f4; text-align: left; }}
tr.failed td {{ background: #fde8e8; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>fedge job {e(s['job'])}</h1>
<table>{head}</table>
<img alt="accuracy, loss, participation, bytes and round duration per round" src="data:image/png;base64,{image}">
<h2>Rounds</h2>
<table><tr>{''.join(f'<th>{e(c)}</th>' for c in cols)}</tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def write_report(records: list[RoundRecord], job: str, out: Path) -> dict[str, Any]:
    """Write ``out``.png and ``out``.html; return the summary."""
    summary = summarize(records, job)
    png = render_png(records, job)
    out.parent.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out.with_name(out.name + ".png"), out.with_name(out.name + ".html")
    from fedge.files import atomic_write

    atomic_write(png_path, png)
    atomic_write(html_path, render_html(records, summary, png).encode())
    summary["png"], summary["html"] = str(png_path), str(html_path)
    return summary


# --- the command ---------------------------------------------------------------


def _follow(cfg: Any, out: Path, key: Any) -> dict[str, Any] | None:
    """Records from the events topic, the report rewritten after each, until
    the job's last round or a signal. With the aggregator's public ``key``,
    an event it did not sign is left out."""
    from fedge_cli.main import round_events

    by_round: dict[int, RoundRecord] = {}
    summary = None
    for record in round_events(cfg, "report", key):
        by_round[record.round] = record
        summary = write_report([by_round[r] for r in sorted(by_round)], cfg.job.name, out)
        print(f"round {record.round}: {summary['html']}", file=sys.stderr)
        if record.round >= cfg.job.rounds:
            break
    return summary


def cmd_report(args: argparse.Namespace) -> int:
    from fedge_cli.main import UsageError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("fedge report draws with matplotlib, which is not installed: pip install "
                         "'fedge[report]' (or matplotlib)") from None
    out = Path(args.out)
    if args.follow:
        if not args.config:
            raise UsageError("--follow reads the job's events topic: give --config job.toml (its [job] and [broker])")
        from aggregator.config import AggregatorConfig
        from fedge import config
        from fedge_cli.status import aggregator_key

        cfg = config.load(args.config, AggregatorConfig, args.set)
        key = aggregator_key(args.aggregator_key, cfg)
        if key is None:
            print("fedge report: events are not checked against the aggregator's signature (give "
                  "--aggregator-key, or run where the job's key file is readable)", file=sys.stderr)
        summary = _follow(cfg, out, key)
        if summary is None:
            raise UsageError("no round was published before the report was stopped")
    else:
        if args.state_dir:
            state, job = Path(args.state_dir), args.job
        elif args.config:
            from aggregator.config import AggregatorConfig
            from fedge import config

            cfg = config.load(args.config, AggregatorConfig, args.set)
            state, job = Path(cfg.job.state_dir), args.job or cfg.job.name
        else:
            raise UsageError("give --state-dir DIR (the aggregator's job.state_dir) or --config job.toml")
        if state.is_dir() and not (state / "rounds.jsonl").is_file() and (state / DEMO_AGGREGATOR).is_dir():
            state = state / DEMO_AGGREGATOR  # a `fedge demo --state-dir` directory: its aggregator's state
        log_file = state / "rounds.jsonl" if state.is_dir() else state
        if not log_file.is_file():
            raise UsageError(f"{log_file} does not exist: point --state-dir at the aggregator's job.state_dir "
                             "(it holds rounds.jsonl once a round has closed)")
        records, bad = read_records(log_file)
        if not records:
            raise UsageError(f"{log_file} holds no round record yet{f' ({bad} line(s) are not records)' if bad else ''}"
                             ": run the job for a round first")
        if bad:
            print(f"fedge report: skipped {bad} line(s) of {log_file} that are not round records", file=sys.stderr)
        summary = write_report(records, job or _job_of(state), out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['rounds']} rounds: {summary['png']}, {summary['html']}")
    return 0


def _job_of(state: Path) -> str:
    """The job's name: the checkpoint's, or the state directory's name."""
    from aggregator.state import CHECKPOINT, StateDir

    root = state if state.is_dir() else state.parent
    if (root / CHECKPOINT).is_file():
        try:
            loaded = StateDir(root, writable=False).load_checkpoint()
        except (OSError, ValueError, FedgeError):
            loaded = None
        if loaded is not None and isinstance(loaded[1].get("job"), str):
            return loaded[1]["job"]
    return root.name


def add_commands(sub: Any) -> None:
    s = sub.add_parser("report", help="draw a job's progress: a PNG and a self-contained HTML page")
    s.add_argument("--state-dir", default=None,
                   help="the aggregator's job.state_dir (or its rounds.jsonl, or a `fedge demo --state-dir`)")
    s.add_argument("--config", default=None, help="the job's TOML config: its state_dir, or with --follow its broker")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the job's config (not for secrets)")
    s.add_argument("--follow", action="store_true",
                   help="read the events topic and rewrite the report after each round, until the job's last")
    s.add_argument("--aggregator-key", default=None, metavar="KEY",
                   help="with --follow: the aggregator's public key (ed25519:... or a file) its events must be "
                        "signed by; default: the job's key file, when readable here")
    s.add_argument("--job", default=None, help="the job's name in the title (default: from the config or directory)")
    s.add_argument("--out", default="fedge-report", help="write OUT.png and OUT.html (default fedge-report)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_report, default_level="WARNING")
