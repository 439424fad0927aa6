"""What an install pulls in: the base is what an inference-only device runs;
secure aggregation and metrics are extras, and a feature configured without
its package stops the command at start in one line naming the extra."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedge
from fedge_cli.main import EXTRAS

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS_OF = PROJECT["optional-dependencies"]
KEY = "ed25519:" + "A" * 43  # a syntactically valid key to pin; nothing connects


def names(requirements):
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def extras(extra, seen=None):
    """Every distribution an extra brings, following fedge[...] references."""
    seen = set() if seen is None else seen
    out = set()
    for req in EXTRAS_OF[extra]:
        m = re.fullmatch(r"fedge\[([\w,]+)\]", req)
        if m:
            for inner in m.group(1).split(","):
                if inner not in seen:
                    seen.add(inner)
                    out |= extras(inner, seen)
        else:
            out |= names([req])
    return out


def test_the_base_install_is_what_an_inference_device_runs():
    base = names(r for r in PROJECT["dependencies"] if ";" not in r)  # less what one Python needs alone
    assert base == {"cryptography", "numpy", "paho-mqtt", "safetensors"}
    assert extras("inference") == {"onnxruntime"}
    assert extras("secagg") == {"pycryptodome"} and extras("metrics") == {"prometheus-client"}
    assert {"torch", "pycryptodome"} <= extras("agent")
    assert {"torch", "dp-accounting", "matplotlib", "pycryptodome", "prometheus-client"} <= extras("aggregator")
    everything = set().union(*(extras(e) for e in EXTRAS_OF if e != "dev"))
    assert everything <= extras("dev") and {"pytest", "hypothesis", "ruff", "mypy"} <= extras("dev")


def test_python_310_and_newer_and_one_version():
    # 3.10: a Jetson's JetPack 6 (Ubuntu 22.04), whose PyTorch is built for it.
    assert PROJECT["requires-python"] == ">=3.10"
    # tomllib's parser from PyPI there, and only there.
    assert [r for r in PROJECT["dependencies"] if r.startswith("tomli")] == ["tomli>=2.0; python_version < '3.11'"]
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert fedge.__version__ == "0.1.0"


def test_every_extra_a_message_names_exists_and_brings_its_package():
    for feature, (module, dist, extra) in EXTRAS.items():
        assert extras(extra) == {dist}, feature
        assert module.split(".")[0] in {"Crypto", "prometheus_client"}


def _eager_imports(node):
    """Modules imported when a module is loaded: outside function bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, ast.Import):
            yield from (a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom) and child.module:
            yield child.module
        yield from _eager_imports(child)


def test_the_optional_packages_are_imported_only_where_they_are_used():
    # A device without fedge[secagg] or fedge[metrics] loads every module; the
    # package is imported only by the code that runs the feature.
    eager = [f"{path.relative_to(ROOT)}: {module}"
             for package in ("fedge", "fedge_cli", "edge_agent", "aggregator", "export")
             for path in sorted((ROOT / package).rglob("*.py"))
             for module in _eager_imports(ast.parse(path.read_text()))
             if module.split(".")[0] in {"Crypto", "prometheus_client"}]
    assert eager == []
    lazy = [path for path in (ROOT / "fedge").rglob("*.py") if "from Crypto" in path.read_text()]
    assert lazy, "the walk would see an import of Crypto"


def _fedge_without(modules, *argv, cwd=None):
    """``fedge ARGV`` in a process where importing ``modules`` fails, as on an
    install without their extra."""
    script = ("import sys\n"
              f"for m in {list(modules)!r}: sys.modules[m] = None\n"
              "from fedge_cli.main import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


NO_CRYPTO = ("Crypto", "Crypto.Protocol", "Crypto.Protocol.SecretSharing")


def _one_line(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_secure_aggregation_without_pycryptodome_stops_the_aggregator_at_start(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "j"\nstate_dir = "{tmp_path / "state"}"\n'
                   '[secagg]\nmode = "on"\nbound = 1.0\n[selection]\nmin_clients = 3\n')
    _one_line(_fedge_without(NO_CRYPTO, "aggregator", "--config", str(job)),
              "secure aggregation", "needs pycryptodome", "pip install 'fedge[secagg]'")
    assert not (tmp_path / "state").exists(), "nothing was started"
    _one_line(_fedge_without(NO_CRYPTO, "demo", "--secure-aggregation"), "pip install 'fedge[secagg]'")


@pytest.mark.parametrize("role", ["aggregator", "agent"])
def test_metrics_without_prometheus_client_stop_either_role_at_start(tmp_path, role):
    config = tmp_path / "c.toml"
    if role == "agent":
        config.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[identity]\naggregator_key = "{KEY}"\n')
    else:
        config.write_text(f'[job]\nname = "j"\nstate_dir = "{tmp_path / "state"}"\n')
    _one_line(_fedge_without(["prometheus_client"], role, "--config", str(config), "--set", "metrics.enabled=true"),
              "metrics (metrics.enabled = true) needs prometheus-client", "pip install 'fedge[metrics]'")


def test_a_device_without_pycryptodome_does_not_offer_secure_aggregation(monkeypatch):
    from edge_agent import capabilities

    assert "secagg" in capabilities.describe()["codecs"]
    for m in NO_CRYPTO:
        monkeypatch.setitem(sys.modules, m, None)
    assert "secagg" not in capabilities.describe()["codecs"]


def test_need_extra_is_one_line_naming_the_extra(monkeypatch):
    from fedge_cli.main import UsageError, has_extra, need_extra

    need_extra("metrics", "metrics.enabled = true")  # installed here: nothing to say
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(UsageError) as err:
        need_extra("metrics", "metrics.enabled = true")
    assert str(err.value) == ("metrics (metrics.enabled = true) needs prometheus-client, which is not installed: "
                              "pip install 'fedge[metrics]'")
    assert not has_extra("metrics") and has_extra("secure aggregation")
