"""The documentation site: the reference pages generated from the code
(docs/hooks/reference.py) cover every command, flag, config key, metric,
topic and log field the code has, and the whole site builds with
``mkdocs build --strict`` (no broken link, no missing anchor, no page left
out of the nav).

The coverage tests walk the code on their own (the parser, the config
dataclasses, ``JobTopics``) rather than through the generator's helpers, so
a generator that skips something is caught."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedge_docs_reference", ROOT / "docs" / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _section(page: str, anchor: str) -> str:
    """The text of the page from the heading with ``{#anchor}`` to the next
    heading of the same or a higher level."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and line.endswith(f"{{#{anchor}}}"))
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start:end])


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


# --- the command line --------------------------------------------------------------


def test_every_flag_of_every_command_is_in_its_commands_section():
    from fedge_cli.main import build_parser

    page = reference.cli_page()
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15  # the walk reached the subcommands (and their own, fedge keys new ...)
    for parser in parsers:
        section = _section(page, reference.command_anchor(parser.prog))
        assert f"usage: {parser.prog}" in section
        for action in parser._actions:
            hidden = action.help == argparse.SUPPRESS  # a deprecated spelling, kept working but not shown
            if hidden or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue  # -h is everywhere; a subcommand has a section of its own
            for name in action.option_strings or [action.dest]:
                assert f"`{name}`" in section, f"{parser.prog} {name} is not on the CLI page"
            if action.help:
                assert reference.md(" ".join(action.help.split())) in section, f"{parser.prog} {action.dest}: help"
            if action.choices is not None:
                assert all(f"`{c}`" in section for c in action.choices), f"{parser.prog} {action.dest}: choices"


def test_every_flag_says_what_it_does():
    from fedge_cli.main import build_parser

    assert not reference.missing_help(build_parser()), "give these add_argument(help=...): they show as (no help text)"


def test_a_required_flag_and_a_default_are_shown_as_such():
    section = _section(reference.cli_page(), "fedge-demo")
    row = next(line for line in section.splitlines() if line.startswith("| `--agents` |"))
    assert "`10`" in row and "(integer)" in row
    fleet = _section(reference.cli_page(), "fedge-simulate")
    assert "**required**" in next(line for line in fleet.splitlines() if line.startswith("| `--devices`, `--agents` |"))


# --- the config --------------------------------------------------------------------


@pytest.mark.parametrize("role", ["aggregator", "agent"])
def test_every_config_key_has_a_row_with_its_default_and_its_doc(role):
    from aggregator.config import AggregatorConfig
    from edge_agent.config import AgentConfig
    from fedge.config import _toml_value

    cls = AggregatorConfig if role == "aggregator" else AgentConfig
    page = reference.config_page()
    role_text = _section(page, role)
    keys = 0
    for section_field in dataclasses.fields(cls):
        section = _section(role_text, f"{role}-{section_field.name}")
        values = getattr(cls(), section_field.name)
        for f in dataclasses.fields(values):
            keys += 1
            row = next((line for line in section.splitlines() if f'id="{role}-{section_field.name}-{f.name}"' in line),
                       None)
            assert row is not None, f"{role}: {section_field.name}.{f.name} is not on the config page"
            assert f"`{section_field.name}.{f.name}`" in row
            assert reference.md(f.metadata["doc"]) in row
            assert reference.code(_toml_value(getattr(values, f.name))) in row
    assert role_text.count(f'<span id="{role}-') == keys  # no row for a key that is gone


# --- metrics (their help texts and labels: tests/unit/test_metrics.py) ------------


def test_every_histogram_shows_the_buckets_its_registry_serves():
    from aggregator.metrics import METRICS

    page = reference.metrics_page()
    row = next(line for line in page.splitlines() if line.startswith("| `fedge_update_fold_seconds` |"))
    assert "Buckets (s): 0.0005, 0.001," in row
    assert all("Buckets (s): 0" in line or "Buckets (versions): 0, 1, 2" in line for line in page.splitlines()
               if line.startswith("| `") and "| histogram |" in line)
    assert any(kind == "histogram" for kind, _, _ in METRICS.values())


# --- topics and messages -----------------------------------------------------------


NOT_TOPICS = ("channel", "parse", "base", "site", "subscription_qos")  # JobTopics members that make no topic


def test_every_topic_a_job_uses_is_on_the_topics_page():
    from fedge.topics import JobTopics

    page = reference.topics_page()
    shown = [re.compile("^" + re.sub(r"<[a-z]+>", "[^/]+", re.escape(p)) + "$")
             for p in re.findall(r"^\| `(fedge/v1/[^`]+)` \|", page, re.M)]
    topics = JobTopics("job1")
    made = []
    for name, member in vars(JobTopics).items():
        if name.startswith("_") or name.endswith("_filter") or name in NOT_TOPICS:
            continue
        if isinstance(member, property):
            made.append(getattr(topics, name))
        elif callable(member):
            args = [0 if p == "index" else "x1" for p in list(inspect.signature(member).parameters)[1:]]
            made.append(getattr(topics, name)(*args))
    assert len(made) >= 10
    for topic in made:
        assert any(p.match(topic) for p in shown), f"{topic} matches no topic on the page"


def test_the_header_keys_read_from_the_source_are_the_ones_on_the_wire():
    from fedge import messages, wire

    for message, optional_set in (
        (messages.Decline("j", 1, "d1", "no data"), False),
        (messages.Ack("j", 1, 1, "d1", "u1", "accepted"), False),
        (messages.Status("d1", "online"), False),
        (messages.Status("d1", "online", seq=3), True),
    ):
        always, optional = reference.header_keys(type(message).encode)
        header = wire.decode(message.encode()).header
        assert set(header) == set(always) | (set(optional) if optional_set else set()), type(message).__name__


def test_every_message_kind_on_mqtt_has_its_section():
    from fedge.wire import Kind

    page = reference.topics_page()
    kinds = reference.message_kinds()
    for kind in Kind:
        if kind < 32:  # from 32 on: between an agent and its training worker, never on MQTT
            assert kind.name in kinds, f"no parse in fedge.messages expects {kind.name}"
            owner = kinds[kind.name]
            assert f"{{#{owner.lower()}}}" in page or owner == "parse_event", owner
    assert "{#event}" in page and "{#roundrecord}" in page


# --- logs ---------------------------------------------------------------------------


def test_every_json_log_field_and_format_is_on_the_logs_page():
    from fedge import logs

    page = reference.logs_page()
    for key in ("time", "level", "logger", "message", "exception", *logs.FIELDS):
        assert f"| `{key}` |" in page, key
    for fmt in logs.FORMATS:
        assert f"`{fmt}`" in page


# --- the generator and the site ---------------------------------------------------------


def test_text_from_code_is_escaped_but_its_code_spans_are_kept():
    assert reference.md("a_b <job> *x* | [y] `x_y|z`") == r"a\_b &lt;job> \*x\* \| \[y\] `x_y|z`"
    assert reference.code("a`b") == "``a`b``"


def test_the_generated_pages_are_in_the_nav_and_not_in_docs():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    for uri in reference.PAGES:
        assert f"- {uri}" in nav, f"{uri} is not in mkdocs.yml's nav"
        assert not (ROOT / "docs" / uri).exists(), f"docs/{uri} is generated: delete the file"


def test_the_site_builds_strict_and_fetches_nothing_from_the_network(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its end of life, not about us
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "WARNING" not in run.stderr, run.stderr[-4000:]
    pages = list(site.rglob("*.html"))
    assert (site / "reference" / "cli.html").is_file() and len(pages) > 20
    assert not (site / "hooks").exists()
    fetched = re.compile(r"<(?:script|link|img)[^>]+(?:src|href)=\"(?:https?:)?//", re.I)
    remote = [str(p.relative_to(site)) for p in pages if fetched.search(p.read_text())]
    assert not remote, f"pages that load something from the network: {remote}"
