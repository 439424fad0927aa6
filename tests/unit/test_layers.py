"""Layers run one way (docs/explanation/architecture.md, "Layers"): the command line (``fedge_cli``)
may import the roles, the roles (``aggregator``, ``edge_agent``, ``export``)
import the contract (``fedge``) and never each other, and the contract
imports nothing above it. Every import is checked, those inside functions
included: a lazy import is still an edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = {
    "fedge": {"fedge"},
    "aggregator": {"fedge", "aggregator"},
    "edge_agent": {"fedge", "edge_agent"},
    "export": {"fedge", "export"},
    "fedge_cli": {"fedge", "fedge_cli", "aggregator", "edge_agent", "export"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file that names one of our packages."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in LAYERS]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_no_import_runs_the_wrong_way(package):
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, name in imported_packages(path):
            if name.split(".")[0] not in LAYERS[package]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import json\n\ndef f():\n    from aggregator.service import AggregatorService\n")
    assert imported_packages(sample) == [(4, "aggregator.service")]
