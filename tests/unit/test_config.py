"""Config files: documented defaults, typo detection, secrets never in the file."""

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from edge_agent.config import AgentConfig
from fedge import config
from fedge.config import ConfigError
from fedge.identity import Identity

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

KEY = Identity.generate().public.to_text()


@pytest.mark.parametrize("cls", [AggregatorConfig, AgentConfig])
def test_rendered_defaults_document_every_key_and_load_back(cls, tmp_path):
    text = config.render_defaults(cls)
    data = tomllib.loads(text)
    for section, body in config.to_dict(cls()).items():
        assert set(data[section]) == set(body)
    path = tmp_path / "c.toml"
    path.write_text(text)
    if cls is AgentConfig:  # signing is on by default: an agent must pin the aggregator's key first
        with pytest.raises(config.ConfigError, match=r"identity\.aggregator_key is empty"):
            config.load(path, cls)
        pinned = config.load(path, cls, [f"identity.aggregator_key={KEY}"])
        assert pinned == config.updated(cls(), identity={"aggregator_key": KEY})
    else:
        assert config.load(path, cls) == cls()
    comments = [line for line in text.splitlines() if line.startswith("# ")]
    keys = [line for line in text.splitlines() if " = " in line and not line.startswith("#")]
    assert len(comments) >= len(keys)


def test_a_typo_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[selection]\nfractoin = 0.1\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, AggregatorConfig)
    msg = str(err.value)
    assert "selection.fractoin" in msg and "fraction" in msg and "\n" not in msg


def test_a_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\nrounds = "ten"\n')
    with pytest.raises(ConfigError, match=r"job\.rounds must be int"):
        config.load(path, AggregatorConfig)


def test_missing_file_and_bad_toml_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", AgentConfig)
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad, AgentConfig)


def test_overrides_and_int_to_float():
    cfg = config.load(None, AggregatorConfig, ["selection.fraction=1", "job.name=mnist", "codec.name=none"])
    assert cfg.selection.fraction == 1.0 and isinstance(cfg.selection.fraction, float)
    assert cfg.job.name == "mnist" and cfg.codec.name == "none"
    assert cfg.codec.params == {}, "the default codec's zlib stage does not stick to another codec"


def test_codec_params_default_to_the_default_codec_s_own(tmp_path):
    assert config.load(None, AggregatorConfig).codec.params == {"lossless": "zlib"}
    job = tmp_path / "job.toml"
    job.write_text('[codec]\nname = "int8"\n')
    assert config.load(job, AggregatorConfig).codec.params == {}
    job.write_text('[codec]\nname = "topk"\nparams = { fraction = 0.05 }\n')
    assert config.load(job, AggregatorConfig).codec.params == {"fraction": 0.05}
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        config.load(None, AgentConfig, ["nodot"])


def test_password_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    b = config.BrokerSettings(password_env="FEDGE_TEST_PW")
    monkeypatch.delenv("FEDGE_TEST_PW", raising=False)
    assert b.password() is None
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    b = dataclasses.replace(b, password_file=str(secret))
    assert b.password() == "s3cret"
    monkeypatch.setenv("FEDGE_TEST_PW", "fromenv")
    assert b.password() == "fromenv"
    with pytest.raises(ConfigError, match="unknown key 'password'"):
        config.from_dict(config.BrokerSettings, {"password": "nope"})


def test_example_configs_in_deploy_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "deploy" / "examples"
    files = sorted(root.glob("*.toml"))
    assert files, "deploy/examples holds the example configs"
    for f in files:
        cls = AgentConfig if "agent" in f.name else AggregatorConfig
        # the agent's pins a key file that install.sh writes
        config.load(f, cls, [f"identity.aggregator_key={KEY}"] if cls is AgentConfig else [])


def test_onnx_exports_without_the_export_toolchain_are_refused_in_one_line(monkeypatch):
    # An aggregator installed with install.sh has fedge[aggregator], not fedge[export].
    import importlib.util

    from aggregator.config import OnnxSection

    section = OnnxSection(every=5, inputs=["x:1x64:float32"])
    section.check()  # this environment has the toolchain
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ConfigError, match=r"onnx.every = 5 needs the export toolchain \(onnx missing\): "
                                          r"pip install 'fedge\[aggregator,export\]'"):
        section.check()
    OnnxSection(every=0).check()  # no exports, no toolchain needed


def _number_settings(cls):
    for sec in dataclasses.fields(cls):
        sub = sec.default_factory()
        for f in dataclasses.fields(sub):
            if type(getattr(sub, f.name)) in (int, float):
                yield f"{sec.name}.{f.name}", f


@pytest.mark.parametrize("cls", [AggregatorConfig, AgentConfig])
def test_every_number_setting_names_the_values_it_allows(cls):
    # A new number setting declares its range (setting(..., valid=...)), so that
    # check_ranges refuses a value out of it before anything starts.
    own_check = {"metrics.port"}  # MetricsSettings.check: "is not a TCP port"
    missing = [key for key, f in _number_settings(cls) if "valid" not in f.metadata and key not in own_check]
    assert not missing, f"give these settings a valid= range: {missing}"
    text = config.render_defaults(cls)
    assert "# Seconds a round stays open; stragglers after it are late. Allowed: a number > 0." in text \
        or cls is AgentConfig


@pytest.mark.parametrize(("cls", "override", "line"), [
    (AggregatorConfig, "selection.deadline_s=-5", "selection.deadline_s = -5 is out of range: use a number > 0"),
    (AggregatorConfig, "selection.deadline_s=nan", "selection.deadline_s = nan is out of range: use a number > 0"),
    (AggregatorConfig, "selection.fraction=0", "selection.fraction = 0 is out of range: use a number in (0, 1]"),
    (AggregatorConfig, "selection.max_clients=-1", "selection.max_clients = -1 is out of range: use an integer >= 0"),
    (AggregatorConfig, "job.rounds=0", "job.rounds = 0 is out of range: use an integer >= 1"),
    (AggregatorConfig, "training.lr=-0.1", "training.lr = -0.1 is out of range: use a number > 0"),
    (AggregatorConfig, "server.weight_cap=0.5",
     "server.weight_cap = 0.5 is out of range: use 0 (no cap) or a number >= 1"),
    (AggregatorConfig, "secagg.bits=30", "secagg.bits = 30 is out of range: use an integer in [2, 24]"),
    (AggregatorConfig, "privacy.delta=1", "privacy.delta = 1 is out of range: use a number in (0, 1)"),
    (AggregatorConfig, "limits.reassembly_timeout_s=inf", "limits.reassembly_timeout_s = inf is out of range"),
    (AggregatorConfig, "broker.keepalive_s=0", "broker.keepalive_s = 0 is out of range: use an integer in [1, 65535]"),
    (AggregatorConfig, "broker.max_packet_bytes=1000",
     "broker.max_packet_bytes = 1000 is out of range: use an integer >= 2086"),
    (AgentConfig, "agent.resend_after_s=0", "agent.resend_after_s = 0 is out of range: use a number > 0"),
    (AgentConfig, "worker.threads=-2", "worker.threads = -2 is out of range: use an integer >= 0"),
    (AgentConfig, "worker.timeout_s=-1", "worker.timeout_s = -1 is out of range: use a number > 0"),
    (AgentConfig, "broker.reconnect_min_s=0", "broker.reconnect_min_s = 0 is out of range: use a number > 0"),
])
def test_a_number_out_of_its_range_is_one_line_naming_the_key_the_value_and_the_range(cls, override, line):
    extra = [f"identity.aggregator_key={KEY}"] if cls is AgentConfig else []
    with pytest.raises(ConfigError) as err:
        config.load(None, cls, [override, *extra])
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_reconnect_delays_must_grow():
    with pytest.raises(ConfigError, match=r"broker\.reconnect_max_s = 0\.5 is below broker\.reconnect_min_s = 1"):
        config.load(None, AggregatorConfig, ["broker.reconnect_max_s=0.5"])


@pytest.mark.parametrize("which", ["aggregator", "agent"])
def test_a_state_directory_that_cannot_be_written_is_one_line_naming_it(tmp_path, which):
    # A path under a regular file: unwritable even for root (chmod is not).
    from aggregator.state import StateDir as AggregatorState
    from edge_agent.state import StateDir as DeviceState

    (tmp_path / "file").write_text("not a directory")
    make, key = (AggregatorState, "job.state_dir") if which == "aggregator" else (DeviceState, "agent.state_dir")
    with pytest.raises(ConfigError) as err:
        make(tmp_path / "file" / "state")
    msg = str(err.value)
    assert msg.startswith(f"{key} '{tmp_path / 'file' / 'state'}' cannot be written: {tmp_path / 'file'} is a file")
    assert f"set {key} to a directory" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="it is a file, not a directory"):
        make(tmp_path / "file")
    made = make(tmp_path / "fresh" / "state")  # made, and the write test leaves nothing behind
    assert made.root.is_dir() and list(made.root.iterdir()) == []


def test_a_report_reads_a_state_directory_without_writing_to_it(tmp_path):
    from aggregator.state import StateDir

    assert StateDir(tmp_path / "absent", writable=False).load_checkpoint() is None
    assert not (tmp_path / "absent").exists()


def _agent(tmp_path, *overrides):
    return config.load(None, AgentConfig, [f"identity.aggregator_key={KEY}",
                                           f"agent.state_dir={tmp_path / 'state'}", *overrides])


def test_an_agents_data_factory_and_model_are_found_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.factory 'mydata:load': module 'mydata' not found on PYTHONPATH "
                                          r"or in the current directory"):
        _agent(tmp_path, "data.factory=mydata:load")
    with pytest.raises(ConfigError, match=r"^data\.factory 'fedge\.datasets:digitz': 'fedge\.datasets' has no "
                                          r"attribute 'digitz'"):
        _agent(tmp_path, "data.factory=fedge.datasets:digitz")
    with pytest.raises(ConfigError, match=r"^data\.factory 'fedge\.datasets' must be written module:callable"):
        _agent(tmp_path, "data.factory=fedge.datasets")
    with pytest.raises(ConfigError, match=r"^agent\.model 'nets:tiny': module 'nets' not found"):
        _agent(tmp_path, "agent.model=nets:tiny")
    # An inference-only device never trains: its data factory is not its concern.
    _agent(tmp_path, "data.factory=mydata:load", "agent.role=inference")
    # Found as the worker finds it: in the current directory too.
    (tmp_path / "mydata.py").write_text("import torch\n\ndef load():\n    return torch.zeros(1)\n")
    _agent(tmp_path, "data.factory=mydata:load")
    with pytest.raises(ConfigError, match=r"'mydata' has no attribute 'loda'"):
        _agent(tmp_path, "data.factory=mydata:loda")
    # With another interpreter for training, that interpreter is asked.
    with pytest.raises(ConfigError, match=r"^data\.factory 'mydata:loda': 'mydata' has no attribute 'loda'"):
        _agent(tmp_path, "data.factory=mydata:loda", f"worker.python={sys.executable}")
    _agent(tmp_path, "data.factory=mydata:load", f"worker.python={sys.executable}")


def test_checking_the_data_factory_imports_neither_it_nor_pytorch(tmp_path):
    import subprocess

    (tmp_path / "mydata.py").write_text("import torch\nraise SystemExit('imported')\n\ndef load():\n    pass\n")
    script = ("import sys\nfrom fedge import config\nfrom edge_agent.config import AgentConfig\n"
              f"config.load(None, AgentConfig, ['data.factory=mydata:load', 'identity.aggregator_key={KEY}'])\n"
              "print(sorted(m for m in ('torch', 'mydata', 'fedge.datasets', 'sklearn') if m in sys.modules))\n")
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_prediction_api_address_is_checked_at_start(tmp_path):
    for bad in ("8080", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match=r"inference\.serve .* must be host:port"):
            _agent(tmp_path, "agent.role=inference", f'inference.serve="{bad}"')
    _agent(tmp_path, "agent.role=inference", "inference.serve=127.0.0.1:8080")
