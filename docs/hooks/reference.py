"""The reference pages of the documentation site, generated from the code at
every build: the command line, the config keys, the metrics, the MQTT topics
and messages, the log fields.

Why generated: a hand-written table of flags, keys or metrics is right the
day it is written and wrong the day someone adds a flag. Each page here is
made from the object the program itself uses: the argparse parser ``fedge``
parses with, the config dataclasses ``fedge config`` prints, the ``METRICS``
tables a scrape is built from, the ``JobTopics`` methods every topic string
comes from, the message classes' ``encode`` methods. So the pages cannot
drift, and a new flag, key or metric is documented by the help text it must
be written with anyway.

Why an MkDocs hook and not the ``mkdocs-gen-files`` plugin: ``on_files`` can
add in-memory pages by itself (``File.generated``, MkDocs 1.6), so this needs
no plugin, no temporary files and nothing but MkDocs; and each page is a
plain function returning Markdown, which ``tests/unit/test_docs.py`` calls
directly. ``python docs/hooks/reference.py cli`` prints one page.

A page must not also exist as a file in ``docs/reference/``: the build stops
rather than let a hand-edited copy shadow the generated one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import logging
import re
import sys
import textwrap
import tokenize
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

GENERATED_NOTE = (
    "!!! note \"Generated\"\n"
    "    This page is generated from {sources} at every build of the documentation "
    "(`docs/hooks/reference.py`): it cannot disagree with the code. Do not edit a copy of it.\n"
)
USAGE_WIDTH = 100  # usage lines wrap here whatever the terminal of whoever builds the site

# --- Markdown from text found in code ----------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_RST_LITERAL = re.compile(r"``(.+?)``", re.S)


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\")
    for ch in "*_[]|":
        text = text.replace(ch, "\\" + ch)
    return text.replace("<", "&lt;")


def md(text: str) -> str:
    """``text`` from code (a help string, a docstring line) as Markdown that
    shows it as written: emphasis marks, brackets, pipes and ``<job>``-like
    placeholders escaped, `code spans` kept as code."""
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out += [_escape(text[pos:m.start()]), m.group(0)]
        pos = m.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def code(text: object) -> str:
    """``text`` as one code span (a longer fence when it holds backticks)."""
    s = str(text)
    fence = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def sentence(text: str) -> str:
    """A help string (``"run the agent"``) as a sentence: capital, full stop."""
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def docstring_md(doc: str | None) -> str:
    """A docstring (reStructuredText-ish, as this project writes them) as
    Markdown: paragraphs joined into lines, ````x```` as code, and a
    paragraph ending in ``::`` followed by its indented block as a code block."""
    if not doc:
        return ""
    lines = inspect.cleandoc(doc).splitlines()
    blocks: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            blocks.append(md(_RST_LITERAL.sub(r"`\1`", " ".join(para))))
            para.clear()

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
            continue
        if line.rstrip().endswith("::"):
            head = line.rstrip()[:-2].rstrip()
            para.append(head + ":" if head else "")
            flush()
            i += 1
            literal: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                literal.append(lines[i])
                i += 1
            body = textwrap.dedent("\n".join(literal)).strip("\n")
            blocks.append(f"```text\n{body}\n```")
            continue
        para.append(line.strip())
        i += 1
    flush()
    return "\n\n".join(b for b in blocks if b)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; cells are Markdown already (see ``md``, ``code``)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell.replace("\n", " ") or " " for cell in row) + " |" for row in rows]
    return "\n".join(out)


def anchor(ident: str) -> str:
    """An empty element with an id: a link target inside a table row."""
    return f'<span id="{ident}"></span>'


# --- reference/cli.md ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from fedge_cli.main import build_parser as build

    return build()


def commands(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    """``parser`` and every subcommand's parser under it, depth first, each
    with its one-line help as its parent gave it (``add_parser(help=...)``)."""

    def walk(p: argparse.ArgumentParser, helptext: str) -> Iterator[tuple[argparse.ArgumentParser, str]]:
        yield p, helptext
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                seen: set[int] = set()
                for name, child in action.choices.items():
                    if id(child) not in seen:  # an alias (fedge fleet) names a parser listed already
                        seen.add(id(child))
                        yield from walk(child, helps.get(name, ""))

    yield from walk(parser, parser.description or "")


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals of one command that the page lists:
    not ``-h`` (every command has it), not the subcommand slot (each
    subcommand gets a section of its own), nothing hidden with SUPPRESS."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS]


def missing_help(parser: argparse.ArgumentParser) -> list[str]:
    """``"fedge fleet --agents"`` for every listed option without help text."""
    return [f"{p.prog} {(a.option_strings or [a.dest])[-1]}" for p, _ in commands(parser)
            for a in documented_actions(p) if not (a.help or "").strip()]


def command_anchor(prog: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prog.lower()).strip("-")


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _expand_help(action: argparse.Action, prog: str) -> str:
    """The help text with argparse's ``%(default)s``-style fields filled in."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % params


def _value(action: argparse.Action) -> str:
    """What follows the option: nothing for a switch, else its metavar (or
    its choices), with the type when argparse converts to a number."""
    if action.nargs == 0:
        return "switch"
    if action.choices is not None and action.metavar is None:
        text = "one of " + ", ".join(code(c) for c in action.choices)
    elif not action.option_strings and action.metavar is None:
        text = ""  # a positional: its name is in the first column already
    else:
        metavar = action.metavar if action.metavar is not None else (
            action.dest.upper() if action.option_strings else action.dest)
        text = code(" ".join(metavar) if isinstance(metavar, tuple) else metavar)
        if action.choices is not None:
            text += " (one of " + ", ".join(code(c) for c in action.choices) + ")"
    kind = {int: "integer", float: "number"}.get(action.type)  # type: ignore[call-overload]
    if kind:
        text += f" ({kind})"
    if action.nargs == "?" and not action.option_strings:
        text += " (optional)"
    if action.nargs in ("+", "*"):
        text += ", " + ("one or more" if action.nargs == "+" else "any number")
    if isinstance(action, argparse._AppendAction):
        text += ", repeatable"
    return text


def _default(action: argparse.Action) -> str:
    if action.required:
        return "**required**"
    if isinstance(action, argparse._VersionAction):
        return ""
    default = action.default
    if isinstance(action, argparse.BooleanOptionalAction):
        return "unset" if default is None else code(action.option_strings[0 if default else 1])
    if action.nargs == 0:
        # store_true's default is False (or SUPPRESS: the parent command's value stands)
        return "on" if isinstance(action, argparse._StoreFalseAction) or default is True else "off"
    if default is None or default is argparse.SUPPRESS or default == []:
        return "none" if action.option_strings else ""
    return code(default)


def _command_section(parser: argparse.ArgumentParser, helptext: str, depth: int) -> str:
    prog = parser.prog
    out = [f"{'#' * min(depth + 1, 6)} `{prog}` {{#{command_anchor(prog)}}}", ""]
    if helptext:
        out += [md(sentence(helptext)), ""]
    if parser.description and parser.description != helptext:
        out += [md(parser.description), ""]
    out += ["```text", _usage(parser), "```", ""]
    rows = []
    for action in documented_actions(parser):
        names = ", ".join(code(s) for s in action.option_strings) or code(action.dest)
        helpline = _expand_help(action, prog).strip()
        rows.append([names, _value(action), _default(action), md(helpline) if helpline else "*(no help text)*"])
    if rows:
        out += [table(["Option", "Value", "Default", "Description"], rows), ""]
    subs = [p for p, _ in commands(parser) if p is not parser and p.prog.count(" ") == prog.count(" ") + 1]
    if subs:
        out += ["Subcommands: " + ", ".join(f"[`{p.prog}`](#{command_anchor(p.prog)})" for p in subs) + ".", ""]
    return "\n".join(out)


def _exit_codes() -> str:
    """The paragraph of ``fedge_cli.main``'s docstring that gives the exit codes."""
    import fedge_cli.main

    for para in inspect.cleandoc(fedge_cli.main.__doc__ or "").split("\n\n"):
        if para.startswith("Exit codes"):
            return docstring_md(para)
    return ""


def cli_page() -> str:
    parser = build_parser()
    out = [
        "# Command line", "",
        GENERATED_NOTE.format(sources="the argparse parser of `fedge` (`fedge_cli/main.py`: `build_parser`)"),
        "Every command below also takes `-h`/`--help`, which prints the same options. Options given before the "
        "command (`fedge --log-format json agent ...`) are the [global options](#fedge).", "",
    ]
    codes = _exit_codes()
    if codes:
        out += [codes, ""]
    for p, helptext in commands(parser):
        depth = max(1, p.prog.count(" "))  # fedge and fedge demo: ##, fedge keys new: ###
        out.append(_command_section(p, helptext if p is not parser else "", depth))
    return "\n".join(out)


# --- reference/config.md --------------------------------------------------------------

_TOML_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "table", list: "array"}


def config_roles() -> list[tuple[str, str, type, str]]:
    """(anchor, title, config class, how it is used) for each role's config."""
    from aggregator.config import AggregatorConfig
    from edge_agent.config import AgentConfig

    return [
        ("aggregator", "Aggregator: the job's config", AggregatorConfig,
         "Read by `fedge aggregator --config job.toml`; the other commands that act on a job take the same file "
         "([command line](cli.md)). `fedge config aggregator` prints it whole."),
        ("agent", "Agent: a device's config", AgentConfig,
         "Read by `fedge agent --config agent.toml` and `fedge simulate --config agent.toml`. "
         "`fedge config agent` prints it whole."),
    ]


def config_keys(cls: type) -> Iterator[tuple[str, dataclasses.Field[Any], str, dataclasses.Field[Any], Any]]:
    """(section name, section field, key, key field, default) of every key of
    the config class ``cls``, in the order ``fedge config`` prints them."""
    instance = cls()
    for sf in dataclasses.fields(cls):
        sub = getattr(instance, sf.name)
        for kf in dataclasses.fields(sub):
            yield sf.name, sf, kf.name, kf, getattr(sub, kf.name)


def key_anchor(role: str, section: str, key: str) -> str:
    return f"{role}-{section}-{key}"


def _config_role(role: str, title: str, cls: type, usage: str) -> str:
    from fedge.config import _toml_value, render_defaults

    out = [f"## {title} {{#{role}}}", "", usage, ""]
    current = None
    hints: dict[str, Any] = {}
    rows: list[list[str]] = []

    def close() -> None:
        if rows:
            out.extend([table(["Key", "Type", "Default", "Allowed", "Description"], rows), ""])
            rows.clear()

    for section, sf, key, kf, default in config_keys(cls):
        if section != current:
            close()
            current = section
            out += [f"### `[{section}]` {{#{role}-{section}}}", "", md(sentence(sf.metadata["doc"])), ""]
            hints = typing.get_type_hints(sf.default_factory)  # section(cls, doc): the section's class
        want = hints[key]
        kind = _TOML_TYPES.get(typing.get_origin(want) or want, getattr(want, "__name__", str(want)))
        valid = kf.metadata.get("valid")
        allowed = md(valid.describe(isinstance(default, int))) if valid is not None else ""
        rows.append([anchor(key_anchor(role, section, key)) + code(f"{section}.{key}"), kind,
                     code(_toml_value(default)), allowed, md(kf.metadata["doc"])])
    close()
    out += [f'??? example "The whole file, as `fedge config {role}` prints it"', "",
            textwrap.indent(f"```toml\n{render_defaults(cls).rstrip()}\n```", "    "), ""]
    return "\n".join(out)


def config_page() -> str:
    roles = config_roles()
    out = [
        "# Configuration", "",
        GENERATED_NOTE.format(sources="the config classes (`aggregator/config.py`, `edge_agent/config.py`, "
                                      "`fedge/config.py`, `fedge/metrics.py`)"),
        "Each role reads one TOML file of `[section]` tables. Every key is optional: a file holds only what "
        "differs from the defaults below. A key the program does not know is refused with a suggestion "
        "(`did you mean ...`), a value of the wrong type or out of range with one line naming the key, at "
        "start, before anything runs.", "",
        "`--set section.key=value` overrides a key from the command line (the value in TOML syntax; a string "
        "may be bare). Secrets never go in the file or on the command line: the broker password comes from "
        "the environment variable `broker.password_env` names, or from the file `broker.password_file` names.",
        "",
        "Each key has an anchor to link to: `config.md#<role>-<section>-<key>`, e.g. "
        f"[`#{key_anchor('aggregator', 'job', 'rounds')}`](#{key_anchor('aggregator', 'job', 'rounds')}).", "",
    ]
    out += [" · ".join(f"[{title}](#{role})" for role, title, _, _ in roles), ""]
    for role, title, cls, usage in roles:
        out.append(_config_role(role, title, cls, usage))
    return "\n".join(out)


# --- reference/metrics.md -------------------------------------------------------------


def metric_tables() -> list[tuple[str, str, str, dict[str, tuple[str, str, tuple[str, ...]]], Callable[..., Any]]]:
    """(anchor, title, module, METRICS, the class whose registry serves them) per role."""
    from aggregator import metrics as agg
    from edge_agent import metrics as agent

    return [("aggregator", "Aggregator", "aggregator/metrics.py", agg.METRICS, agg.AggregatorMetrics),
            ("agent", "Agent", "edge_agent/metrics.py", agent.METRICS, agent.AgentMetrics)]


def histogram_buckets(metrics_class: Callable[..., Any]) -> dict[str, list[str]]:
    """The bucket bounds of each histogram a role's registry serves, read
    from the registry itself (never started: no port is opened)."""
    from fedge.metrics import MetricsSettings

    service = metrics_class(MetricsSettings())
    out: dict[str, list[str]] = {}
    for family in service.registry.collect():
        if family.type == "histogram":
            out[family.name] = [s.labels["le"] for s in family.samples
                                if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    return out


def _metrics_settings_toml() -> str:
    from edge_agent.metrics import AgentMetricsSettings
    from fedge.config import _toml_value
    from fedge.metrics import MetricsSettings

    agg, agent = MetricsSettings(), AgentMetricsSettings()
    lines = ["[metrics]"]
    for f in dataclasses.fields(agg):
        value = _toml_value(getattr(agg, f.name) if f.name != "enabled" else True)
        note = f"  # the agent's default is {getattr(agent, f.name)}" if getattr(agent, f.name) != getattr(
            agg, f.name) else ""
        lines.append(f"{f.name} = {value}{note}")
    return "\n".join(lines)


METRICS_INTRO = """\
Both roles serve Prometheus metrics when asked, each from a registry of its own
(`prometheus-client`). They are off by default; on, they listen on loopback
unless told otherwise (all keys: [aggregator](config.md#aggregator-metrics),
[agent](config.md#agent-metrics)):

```toml
{settings}
```

Scrape `GET http://127.0.0.1:{port}/metrics` (the agent: port {agent_port}). A
host other than loopback is reachable by whoever reaches the machine: serve
over HTTPS (`metrics.cert_file` and `metrics.key_file`) or put a firewall in
front. A port already taken stops the service at start with one line naming
the key to change.

A service's loop copies its counts into a snapshot at most once a second (and
at every round's end); a scrape reads the latest snapshot, never the loop's
live state. Counters kept in the aggregator's checkpoint (rounds, updates,
rejections) survive restarts; byte counts and histograms start again at zero,
which `rate()` handles. No label ever carries a device id (one series per
device would grow without bound): per-device detail is in `rounds.jsonl`,
`fedge status` and the logs. The standard `process_*` metrics (on Linux) and
`python_info` of `prometheus-client` come too.

A Grafana dashboard on these metrics, and the alerts to start from, are in
[Monitoring](../how-to/monitoring.md).
"""

AGGREGATOR_NOTES = """\
Update statuses match the receipts devices get. The reasons of
`fedge_updates_rejected_total` are the receipt reasons (`stale_base`,
`not_selected`, `bad_samples`, `unknown_sender`, ...); the kinds of
`fedge_incidents_total` are what never became an update (`rate_limited`,
`bad_status`, `replayed_status`, `chunk_*`, `unresponsive`, `internal_error`,
...).
"""

AGENT_NOTES = """\
A process that runs several devices sums them and says how many there
are (`fedge_agent_devices`).
"""


def metrics_page() -> str:
    from edge_agent.metrics import AgentMetricsSettings
    from fedge.metrics import MetricsSettings

    out = ["# Metrics", "",
           GENERATED_NOTE.format(sources="the `METRICS` tables of `aggregator/metrics.py` and "
                                         "`edge_agent/metrics.py`, and the registries built from them"),
           METRICS_INTRO.format(settings=_metrics_settings_toml(), port=MetricsSettings().port,
                                agent_port=AgentMetricsSettings().port)]
    notes = {"aggregator": AGGREGATOR_NOTES, "agent": AGENT_NOTES}
    for role, title, module, metrics, cls in metric_tables():
        buckets = histogram_buckets(cls)
        # Histograms built from the service's snapshot, not its registry: (unit, bounds).
        built = getattr(sys.modules[cls.__module__], "SNAPSHOT_HISTOGRAMS", {})
        rows = []
        for name, (kind, helptext, labels) in metrics.items():
            what = md(helptext)
            if kind == "histogram" and name in built:
                unit, bounds = built[name]
                what += f" Buckets ({unit}): " + ", ".join(f"{b:g}" for b in bounds) + "."
            elif kind == "histogram":
                what += " Buckets (s): " + ", ".join(buckets.get(name, [])) + "."
            rows.append([code(name), kind, ", ".join(code(label) for label in labels) or "", what])
        out += [f"## {title} {{#{role}}}", "", f"From `{module}`.", "",
                table(["Metric", "Type", "Labels", "Meaning"], rows), "", notes[role]]
    return "\n".join(out)


# --- reference/topics.md --------------------------------------------------------------

_PLACEHOLDER = {"index": "i"}  # the topic tree's own names for parameters (fedge/topics.py's docstring)
_SAMPLE: dict[str, object] = {"index": 0}
_DOC_TOPIC = re.compile(r"^(fedge/v1/\S+)\s+(?:(retained)\s+)?(.+)$")


@functools.cache
def _module_tree(module: ModuleType) -> ast.Module:
    return ast.parse(inspect.getsource(module))


@functools.cache
def _source_comments(module: ModuleType) -> tuple[dict[int, str], dict[int, str]]:
    """(line -> comment after code on it, line -> comment alone on it) of a module."""
    trailing: dict[int, str] = {}
    alone: dict[int, str] = {}
    source = inspect.getsource(module)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            (alone if not lines[row - 1][:col].strip() else trailing)[row] = text
    return trailing, alone


def topic_rows() -> list[dict[str, str]]:
    """One entry per topic a ``JobTopics`` makes: its pattern, the filter
    that subscribes to all of its kind, the channel ``parse`` names it, and
    what it carries (the method's docstring, else the module's topic list)."""
    from fedge.topics import ROOT, JobTopics

    placeholder_job, sample_job = "<job>", "job1"
    listed: dict[str, tuple[bool, str]] = {}
    for line in (sys.modules[JobTopics.__module__].__doc__ or "").splitlines():
        m = _DOC_TOPIC.match(line.strip())
        if m:
            listed[m.group(1)] = (bool(m.group(2)), m.group(3))
    shown, sample = JobTopics(sample_job), JobTopics(sample_job)

    def make(obj: JobTopics, name: str, member: object, fill: Callable[[str], object]) -> object:
        if isinstance(member, property):
            return getattr(obj, name)
        params = list(inspect.signature(member).parameters)[1:]  # type: ignore[arg-type]
        return getattr(obj, name)(*(fill(p) for p in params))

    def pattern(text: str) -> str:
        return text.replace(f"{ROOT}/{sample_job}", f"{ROOT}/{placeholder_job}")

    members = {n: m for n, m in vars(JobTopics).items() if not n.startswith("_") and (
        isinstance(m, property) or inspect.isfunction(m))}
    rows = []
    for name, member in members.items():
        if name.endswith("_filter"):
            continue
        try:
            topic = make(shown, name, member, lambda p: f"<{_PLACEHOLDER.get(p, p)}>")
        except TypeError:
            continue
        if not isinstance(topic, str) or not topic.startswith(shown.base + "/"):
            continue  # not a topic: channel(), parse(), base
        topic = pattern(topic)
        filt_name = name.removesuffix("_chunk") + "_filter"
        filt = pattern(str(make(shown, filt_name, members[filt_name], lambda p: f"<{p}>"))) \
            if filt_name in members else ""
        concrete = make(sample, name, member, lambda p: _SAMPLE.get(p, "x1"))
        channel = sample.channel(str(concrete))
        doc = inspect.getdoc(member.fget if isinstance(member, property) else member) or ""
        retained_listed, what_listed = listed.get(topic, (False, ""))
        what = doc.split("\n\n")[0] if doc else what_listed
        if not what:
            raise ValueError(f"JobTopics.{name} ({topic}) is not described: give it a docstring, or list it in "
                             f"fedge/topics.py's docstring")
        retained = retained_listed or "retained" in doc.lower()
        rows.append({"name": name, "topic": topic, "filter": filt, "channel": channel,
                     "retained": "yes" if retained else "", "what": what})
    return rows


def message_kinds() -> dict[str, str]:
    """Kind name -> the class (or function) of ``fedge.messages`` that parses
    it, found in the source: the ``Kind`` each ``parse`` expects."""
    from fedge import messages

    found: dict[str, str] = {}
    for top in _module_tree(messages).body:
        for node in ast.walk(top):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_expect"
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Attribute)):
                owner = top.name if isinstance(top, (ast.ClassDef, ast.FunctionDef)) else "?"
                found[node.args[1].attr] = owner
    return found


def header_keys(func: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """(keys every header has, keys only some have) of the header ``func``
    (an ``encode``) builds, read from its source: the dict assigned to
    ``header`` or handed to ``wire.encode``, ``header["k"] = ...`` and
    ``header.update(k=...)``. A key set under an ``if`` is optional; dicts
    nested in a header's values are not its keys."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    always: list[str] = []
    optional: list[str] = []

    def add(keys: list[str], conditional: bool) -> None:
        for key in keys:
            target = optional if conditional else always
            if key not in always and key not in target:
                target.append(key)

    def dict_keys(node: ast.Dict) -> list[str]:
        return [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]

    def is_header(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "header"

    def visit(node: ast.AST, conditional: bool) -> None:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if is_header(target) and isinstance(node.value, ast.Dict):
                    add(dict_keys(node.value), conditional)
                elif (isinstance(target, ast.Subscript) and is_header(target.value)
                      and isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str)):
                    add([target.slice.value], conditional)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "update" and is_header(node.func.value):
                add([k.arg for k in node.keywords if k.arg], conditional)
            elif (node.func.attr == "encode" and isinstance(node.func.value, ast.Name) and node.func.value.id == "wire"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Dict)):
                add(dict_keys(node.args[1]), conditional)
        for child in ast.iter_child_nodes(node):
            visit(child, conditional or isinstance(node, ast.If))

    visit(tree, False)
    return always, [k for k in optional if k not in always]


def _short(value: object) -> str:
    text = repr(value)
    return code(text) if len(text) <= 40 else "see code"


def dataclass_fields(cls: type) -> list[list[str]]:
    """(field, type, default, note) rows: the note is the field's comment in
    the source, after it or on the lines just above it (not a group title
    ending in ':')."""
    module = sys.modules[cls.__module__]
    trailing, alone = _source_comments(module)
    node = next(n for n in ast.walk(_module_tree(module)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    annotations = {n.target.id: n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    rows = []
    for f in dataclasses.fields(cls):
        ann = annotations[f.name]
        note = next((trailing[r] for r in range(ann.lineno, (ann.end_lineno or ann.lineno) + 1) if r in trailing), "")
        if not note:
            above: list[str] = []
            row = ann.lineno - 1
            while row in alone:
                above.insert(0, alone[row])
                row -= 1
            note = "" if not above or above[-1].endswith(":") else " ".join(above)
        if f.default is not dataclasses.MISSING:
            default = _short(f.default)
        elif isinstance(f.default_factory, type):
            default = code(f"{f.default_factory.__name__}()")
        elif f.default_factory is not dataclasses.MISSING:
            default = _short(f.default_factory())
        else:
            default = "required"
        rows.append([code(f.name), code(ast.unparse(ann.annotation)), default, md(note)])
    return rows


def _class_doc(cls: type) -> str:
    """A class's docstring, or (a dataclass without one has a generated
    ``Name(field: type, ...)``) the first paragraph of its module's."""
    doc = cls.__doc__ or ""
    if not doc or doc.startswith(cls.__name__ + "("):
        doc = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0]
    return docstring_md(doc)


def _nested(cls: type, seen: set[type]) -> Iterator[type]:
    """Dataclasses a message carries inside its header (training plan, key links, ...)."""
    for hint in typing.get_type_hints(cls).values():
        for t in (hint, *typing.get_args(hint), *(a for h in typing.get_args(hint) for a in typing.get_args(h))):
            if isinstance(t, type) and dataclasses.is_dataclass(t) and t not in seen:
                seen.add(t)
                yield t


def _wire_section() -> str:
    from fedge import wire

    kinds = message_kinds()
    trailing, alone = _source_comments(wire)
    kind_class = next(n for n in _module_tree(wire).body
                      if isinstance(n, ast.ClassDef) and n.name == wire.Kind.__name__)
    kind_lines = {n.targets[0].id: n.lineno for n in kind_class.body
                  if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    local_from = next((r for r, text in alone.items() if text.lower().startswith("local only")), None)
    rows = []
    for kind in wire.Kind:
        line = kind_lines.get(kind.name, 0)
        where = "local (agent and its training worker)" if local_from and line > local_from else "MQTT"
        owner = kinds.get(kind.name, "")
        link = f"[`{owner}`](#{owner.lower()})" if owner and owner[0].isupper() else (code(owner) if owner else "")
        rows.append([code(kind.name), str(int(kind)), where, link, md(trailing.get(line, ""))])
    return "\n".join([
        "## The envelope {#envelope}", "", docstring_md(wire.__doc__), "",
        "### Kinds {#kinds}", "",
        table(["Kind", "Value", "Travels", "Message", "Note"], rows), ""])


def topics_page() -> str:
    from fedge import messages, topics
    from fedge.records import RoundRecord

    # The module docstring's second paragraph says why ids sit in topic levels;
    # its list of topics (the literal block after it) is the table below.
    intro = inspect.cleandoc(topics.__doc__ or "").split("\n\n")
    why = intro[1].rstrip() if len(intro) > 1 else ""
    why = why[:-2].rstrip() + "." if why.endswith("::") else why
    out = ["# MQTT topics and messages", "",
           GENERATED_NOTE.format(sources="`fedge/topics.py` (`JobTopics`), `fedge/wire.py` and the message "
                                         "classes of `fedge/messages.py`"),
           docstring_md(why), "",
           "How the roles use these topics and messages, round by round, is told in "
           "[Protocol](../explanation/protocol.md).", "",
           "## Topics {#topics}", "",
           "`<job>` is the job's name (`job.name`), `<client>` a device id (`agent.id`). The channel is how the "
           "`channel` label of the transport metrics ([metrics](metrics.md)) names a topic's traffic.", ""]
    rows = [[code(r["topic"]), code(r["filter"]) if r["filter"] else "", r["retained"], code(r["channel"]),
             md(_RST_LITERAL.sub(r"`\1`", " ".join(r["what"].split())))] for r in topic_rows()]
    out += [table(["Topic", "Subscribe with", "Retained", "Channel", "Carries"], rows), ""]
    out.append(_wire_section())
    out += ["## Messages {#messages}", "", docstring_md(messages.__doc__), ""]
    kinds = {owner: kind for kind, owner in message_kinds().items()}
    seen: set[type] = set()
    nested: list[type] = []
    for name, cls in vars(messages).items():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == messages.__name__
                and name in kinds):
            continue
        always, optional = header_keys(cls.encode)  # type: ignore[attr-defined]
        out += [f"### {name} {{#{name.lower()}}}", "", f"Kind {code(kinds[name])}.", "",
                docstring_md(cls.__doc__), "",
                "Header keys: " + ", ".join(code(k) for k in always)
                + ("; when set: " + ", ".join(code(k) for k in optional) if optional else "") + ".", "",
                table(["Field", "Type", "Default", "Note"], dataclass_fields(cls)), ""]
        nested += _nested(cls, seen)
    if "encode_event" in vars(messages):
        always, optional = header_keys(messages.encode_event)
        out += ["### Event {#event}", "", f"Kind {code(kinds.get('parse_event', 'EVENT'))}: one per closed "
                "round, on the events topic; its `record` is a [`RoundRecord`](#roundrecord).", "",
                "Header keys: " + ", ".join(code(k) for k in always) + ".", ""]
        nested.append(RoundRecord)
    out += ["## Objects inside messages {#objects}", ""]
    for cls in nested:
        out += [f"### {cls.__name__} {{#{cls.__name__.lower()}}}", "", f"From `{cls.__module__}`.", "",
                _class_doc(cls), "", table(["Field", "Type", "Default", "Note"], dataclass_fields(cls)), ""]
    if hasattr(messages, "DEVICE_INFO"):
        out += ["### Presence info {#presence-info}", "",
                "What a device's presence (`Status.info`) may say about it that the aggregator keeps and "
                "`fedge status` shows (`DEVICE_INFO`); anything else is dropped.", "",
                table(["Key", "Type"], [[code(k), code(t.__name__)] for k, t in messages.DEVICE_INFO.items()]), ""]
    if hasattr(messages, "SECAGG_STAGES"):
        out += ["### Secure aggregation stages {#secagg-stages}", "",
                "The `stage` of a [`SecAggStage`](#secaggstage) (`SECAGG_STAGES`): who sends it and the size of "
                "each entry of its body.", "",
                table(["Stage", "Sent by", "Bytes per entry"],
                      [[code(s), who, str(size)] for s, (who, size) in messages.SECAGG_STAGES.items()]), ""]
    return "\n".join(out)


# --- reference/logs.md ----------------------------------------------------------------

LOG_FIELDS = {
    "time": "When, in UTC: ISO 8601 with milliseconds (`2025-01-31T12:00:00.123Z`).",
    "level": "`debug`, `info`, `warning`, `error` or `critical`.",
    "logger": "Who wrote it: the module's logger (`aggregator.rounds`, `edge_agent.core`, ...).",
    "message": "The line in words, as the text format shows it.",
    "job": "The job the line is about.",
    "round": "The round the line is about.",
    "attempt": "The attempt of that round: a round opened again (after the aggregator restarted) keeps its "
               "number and takes the next attempt.",
    "device": "The device id the line is about.",
    "reason": "A short machine-readable tag: the counter the event bumped (`stale_base`, `rate_limited`, "
              "`training_failed`, ...), as in the metrics' `reason` and `kind` labels.",
    "status": "An update's receipt status (`accepted`, `duplicate`, `late`, `rejected`).",
    "exception": "The traceback, when the line reports an exception.",
}
LOG_ENVIRONMENT = {
    "FEDGE_LOG_LEVEL": "The level of a process started without `--log-level`; `fedge` sets it for the "
                       "processes it starts (the training worker, the aggregator's export run).",
    "FEDGE_LOG_FORMAT": "The format likewise: `text` or `json`.",
}


def json_log_fields() -> list[str]:
    """The keys ``--log-format json`` writes, read off the formatter itself
    with every structured field set and an exception attached."""
    from fedge import logs

    try:
        raise RuntimeError("example")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("fedge", logging.ERROR, __file__, 1, "example", None, exc_info)
    for key in logs.FIELDS:
        setattr(record, key, 1)
    return list(json.loads(logs.JsonFormatter().format(record)))


def logs_page() -> str:
    from fedge import logs

    keys = json_log_fields()
    undocumented = [k for k in keys if k not in LOG_FIELDS]
    stale = [k for k in LOG_FIELDS if k not in keys]
    if undocumented or stale:
        raise ValueError(f"docs/hooks/reference.py LOG_FIELDS: describe {undocumented}, drop {stale}")
    source = inspect.getsource(logs)
    missing = [name for name in LOG_ENVIRONMENT if name not in source]
    if missing:
        raise ValueError(f"docs/hooks/reference.py LOG_ENVIRONMENT: fedge/logs.py no longer reads {missing}")
    parser = build_parser()
    log_format = next(a for a in parser._actions if "--log-format" in a.option_strings)
    levels = [[f"[`{p.prog}`](cli.md#{command_anchor(p.prog)})", code(p.get_default("default_level"))]
              for p, _ in commands(parser) if p.get_default("default_level")]
    out = ["# Logs", "",
           GENERATED_NOTE.format(sources="`fedge/logs.py` (its JSON formatter, run on an example line) and the "
                                         "`fedge` parser"),
           "Every role logs to stderr (under systemd: the journal). `--log-format` chooses the format: "
           + ", ".join(code(c) for c in (log_format.choices or logs.FORMATS))
           + "; `--log-level` the level. Both are [global options](cli.md#fedge), given before the command: "
           "`fedge --log-format json aggregator --config job.toml`.", "",
           "## JSON lines {#json}", "",
           "With `--log-format json`, each line is one JSON object with these keys; a key that does not apply "
           "to the line is left out.", "",
           table(["Key", "Meaning"], [[code(k), md(LOG_FIELDS[k])] for k in keys]), "",
           "## Default level per command {#levels}", "",
           "Without `--log-level`:", "", table(["Command", "Level"], levels), "",
           "## Environment {#environment}", "",
           table(["Variable", "Meaning"], [[code(k), md(v)] for k, v in LOG_ENVIRONMENT.items()]), ""]
    return "\n".join(out)


# --- the hook -------------------------------------------------------------------------

_PACKAGES = ("fedge", "fedge_cli", "aggregator", "edge_agent", "export")
_serving = False  # under `mkdocs serve`: every rebuild imports the code afresh

PAGES: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_page,
    "reference/config.md": config_page,
    "reference/metrics.md": metrics_page,
    "reference/topics.md": topics_page,
    "reference/logs.md": logs_page,
}


def on_startup(command: str, dirty: bool) -> None:
    """MkDocs: note whether this process serves the site (and rebuilds it)."""
    global _serving
    _serving = command == "serve"


def on_files(files: Any, config: Any) -> Any:
    """MkDocs: add the generated pages to the site's files.

    ``mkdocs serve`` rebuilds in the same process when the code changes
    (mkdocs.yml's ``watch``); the project's modules are dropped first so that
    the pages are made from the code as it is now, not as it was imported."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    if _serving:
        for name in [n for n in sys.modules if n.split(".")[0] in _PACKAGES]:
            del sys.modules[name]
    for uri, page in PAGES.items():
        if files.get_file_from_path(uri) is not None:
            raise PluginError(f"docs/{uri} is generated by docs/hooks/reference.py; delete the file in docs/")
        try:
            content = page()
        except (ValueError, LookupError) as exc:  # something in the code the page cannot describe: say what
            raise PluginError(f"{uri}: {exc}") from exc
        files.append(File.generated(config, uri, content=content))
    return files


if __name__ == "__main__":
    names = {Path(uri).stem: page for uri, page in PAGES.items()}
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python docs/hooks/reference.py {{{','.join(names)}}}")
    sys.stdout.write(names[sys.argv[1]]())
