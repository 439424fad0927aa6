"""Config files: documented defaults, typo detection, secrets never in the file."""

import dataclasses
import sys

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
