"""Fixtures for the export tests: the zoo exported once per session, a
quickly trained digits model, and a harness that runs the export CLI the
way ``fedge`` will (parse, dispatch to ``func``, exit code, stdout/stderr)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from export import cli
from export.signature import parse_input_spec

# name -> (factory, input spec, quantization mode the family calls for)
ZOO = {
    "mlp": ("tests.export.zoo:mlp", "x:1x64", "static"),
    "cnn": ("tests.export.zoo:cnn", "x:1x1x28x28", "static"),
    "mobilenet_block": ("tests.export.zoo:mobilenet_block", "x:1x3x32x32", "static"),
    "lstm": ("tests.export.zoo:lstm", "x:1x10x16", "dynamic"),
    "gru": ("tests.export.zoo:gru", "x:1x10x16", "dynamic"),
    "transformer": ("tests.export.zoo:transformer", "x:1x12x8", "dynamic"),
}


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    def run(*argv: str) -> CliResult:
        parser = argparse.ArgumentParser(prog="fedge")
        sub = parser.add_subparsers(dest="command")
        cli.add_commands(sub)
        args = parser.parse_args([str(a) for a in argv])
        capsys.readouterr()
        code = args.func(args)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def zoo_model(name: str):
    """The zoo model with the weights the session's export used (seeded)."""
    from fedge.torchkit import build_model

    return build_model(ZOO[name][0], seed=0).eval()


@pytest.fixture(scope="session")
def exported_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from export.onnx_export import export_model

    folder = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name, (factory, spec, _) in ZOO.items():
        result = export_model(zoo_model(name), [parse_input_spec(spec)], folder / f"{name}.onnx",
                              source={"factory": factory, "factory_args": {}})
        paths[name] = result.path
    return paths


def sample_inputs(name: str, rows: int, seed: int = 0) -> np.ndarray:
    spec = parse_input_spec(ZOO[name][1])
    return np.random.default_rng(seed).standard_normal((rows, *spec.sample_shape)).astype(np.float32)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fedge.models:digits_mlp trained for a few epochs, exported, plus
    calibration/evaluation .npz files."""
    import torch

    from fedge.datasets import digits
    from fedge.models import digits_mlp

    folder = tmp_path_factory.mktemp("digits")
    x_tr, y_tr = digits(split="train")
    x_te, y_te = digits(split="test")
    torch.manual_seed(0)
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(30):
        for i in range(0, len(xt), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i:i + 128]), yt[i:i + 128]).backward()
            opt.step()
    weights = folder / "digits.pt"
    torch.save(model.state_dict(), weights)
    np.savez(folder / "calib.npz", x=x_tr[:256])
    np.savez(folder / "eval.npz", x=x_te, labels=y_te)
    # Activations 100x smaller than real data: ranges calibrated on them clip every real activation.
    np.savez(folder / "bad_calib.npz", x=x_tr[:256] * 0.01)
    from export.onnx_export import export_from_factory

    export_from_factory("fedge.models:digits_mlp", [parse_input_spec("x:1x64")], folder / "digits.onnx",
                        weights=weights)
    return {"dir": folder, "weights": weights, "onnx": folder / "digits.onnx", "calib": folder / "calib.npz",
            "eval": folder / "eval.npz", "bad_calib": folder / "bad_calib.npz"}
