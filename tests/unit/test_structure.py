"""The aggregator stays in rooms a newcomer can read: no class over 400
lines, no function over 50, the round lifecycle under 250 (issue 27's
bar; ``docs/explanation/architecture.md`` says which module holds which concern)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_CLASS, MAX_FUNCTION, MAX_LIFECYCLE = 400, 50, 250


def sizes():
    for path in sorted((ROOT / "aggregator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node, node.end_lineno - node.lineno + 1


def test_no_class_or_function_in_the_aggregator_outgrows_its_room():
    big = [f"{path}:{node.lineno} {node.name} ({n} lines)" for path, node, n in sizes()
           if n > (MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION)]
    assert not big, "split these (docs/explanation/architecture.md): " + "; ".join(big)


def test_the_lifecycle_module_stays_small():
    assert len((ROOT / "aggregator" / "lifecycle.py").read_text().splitlines()) < MAX_LIFECYCLE
