"""The export toolchain as a user drives it: the ``fedge`` subcommands
(through the same ``add_commands`` the ``fedge`` parser uses), their exit
codes, one-line errors, JSON reports, and ``predict`` on a device without
PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _one_line_error(result, command: str) -> str:
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"fedge {command}: error: ")
    assert "Traceback" not in result.err + result.out
    return lines[0]


def test_export_command_writes_model_and_manifest(run_cli, tmp_path):
    out = tmp_path / "digits.onnx"
    r = run_cli("export", "--model", "fedge.models:digits_mlp", "--model-args", '{"hidden": 32}',
                "--input", "x:1x64:float32", "--out", out)
    assert r.code == 0, r.err
    assert "parity with PyTorch" in r.out and "FAIL" not in r.out
    manifest = json.loads((tmp_path / "digits.manifest.json").read_text())
    assert manifest["source"]["factory_args"] == {"hidden": 32}
    # Running it again without --force refuses to overwrite; with --force it replaces.
    again = run_cli("export", "--model", "fedge.models:digits_mlp", "--input", "x:1x64", "--out", out)
    assert "--force" in _one_line_error(again, "export")
    assert run_cli("export", "--model", "fedge.models:digits_mlp", "--input", "x:1x64", "--out", out,
                   "--force").code == 0


@pytest.mark.parametrize("argv, names", [
    (["--model", "fedge.modelz:digits_mlp", "--input", "x:1x64"], ["fedge.modelz", "PYTHONPATH"]),
    (["--model", "fedge.models.digits_mlp", "--input", "x:1x64"], ["module:callable"]),
    (["--model", "tests.export.zoo:not_a_module", "--input", "x:1x64"], ["not a torch.nn.Module"]),
    (["--model", "fedge.models:digits_mlp", "--input", "x:1x65"], ["x:1x65:float32", "does not fit", "--input"]),
    (["--model", "fedge.models:digits_mlp", "--input", "x:1xabc"], ["abc"]),
    (["--model", "fedge.models:digits_mlp", "--input", "x:1x64", "--weights", "missing.pt"], ["missing.pt"]),
    (["--model", "tests.export.zoo:custom_op_model", "--input", "x:1x8"],
     ["fedge_zoo.sensor_fusion", "--legacy-exporter"]),
    (["--model", "tests.export.zoo:custom_op_model", "--input", "x:1x8", "--legacy-exporter"],
     ["fedge_zoo::sensor_fusion", "legacy"]),
    (["--model", "fedge.models:digits_mlp", "--input", "x:1x64", "--opset", "9"], ["--opset 9"]),
    (["--model", "fedge.models:digits_mlp", "--model-args", "[1]", "--input", "x:1x64"], ["--model-args"]),
])
def test_export_bad_input_is_one_line_and_exit_2(run_cli, tmp_path, argv, names):
    line = _one_line_error(run_cli("export", *argv, "--out", tmp_path / "m.onnx"), "export")
    for name in names:
        assert name in line
    assert not (tmp_path / "m.onnx").exists()


def test_weights_that_are_not_a_state_dict_are_refused_without_unpickling(run_cli, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(Payload()))
    line = _one_line_error(run_cli("export", "--model", "fedge.models:digits_mlp", "--input", "x:1x64",
                                   "--weights", bad, "--out", tmp_path / "m.onnx"), "export")
    assert "weights_only=True" in line and not Path("pwned").exists()


def test_quantize_report_and_accuracy_gate(run_cli, digits_model, tmp_path):
    out, report = tmp_path / "digits.int8.onnx", tmp_path / "report.json"
    r = run_cli("quantize", "--model", digits_model["onnx"], "--out", out, "--calibration", digits_model["calib"],
                "--eval", digits_model["eval"], "--max-accuracy-drop", "2", "--json", report, "--runs", "50")
    assert r.code == 0, r.err
    for row in ("size", "accuracy", "top-1 agreement", "latency p50", "latency p90", "intra-op threads"):
        assert row in r.out
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and doc["reference"]["accuracy"] > 0.9
    assert doc["accuracy_drop_points"] <= 2 and doc["top1_agreement"] > 0.95
    assert doc["size_ratio"] < 1 and doc["candidate"]["latency"]["runs"] >= 50
    assert doc["candidate"]["latency"]["graph_optimization"] == "ORT_ENABLE_ALL"
    assert out.exists() and (tmp_path / "digits.int8.manifest.json").exists()


def test_accuracy_gate_fails_with_exit_1_on_bad_calibration(run_cli, digits_model, tmp_path):
    out, report = tmp_path / "bad.onnx", tmp_path / "bad.json"
    r = run_cli("quantize", "--model", digits_model["onnx"], "--out", out, "--calibration",
                digits_model["bad_calib"], "--eval", digits_model["eval"], "--max-accuracy-drop", "0.5",
                "--json", report, "--no-latency")
    assert r.code == 1, (r.out, r.err)
    assert "accuracy" in r.out
    err = r.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedge quantize: failed:") and "--max-accuracy-drop 0.5" in err[0]
    assert json.loads(report.read_text())["passed"] is False


def test_quantize_with_a_data_spec_for_calibration_and_evaluation(run_cli, digits_model, tmp_path):
    r = run_cli("quantize", "--model", digits_model["onnx"], "--out", tmp_path / "q.onnx", "--calibration",
                "fedge.datasets:digits", "--eval", "fedge.datasets:digits", "--method", "percentile",
                "--target", "x86", "--no-vnni", "--no-latency", "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["eval_rows"] == 450  # digits' test split
    assert doc["config"]["reduce_range"] is True and doc["config"]["activation_type"] == "uint8"
    assert doc["accuracy_drop_points"] < 2


@pytest.mark.parametrize("argv, names", [
    (["--calibration", "nowhere.npz"], ["nowhere.npz", "not found"]),
    ([], ["--calibration"]),
    (["--calibration", "fedge.datasets:nope"], ["nope"]),
    (["--mode", "dynamic", "--max-accuracy-drop", "1"], ["--eval"]),
    (["--mode", "dynamic", "--target", "jetson"], ["jetson", "static"]),
])
def test_quantize_bad_input_is_one_line_and_exit_2(run_cli, digits_model, tmp_path, argv, names):
    r = run_cli("quantize", "--model", digits_model["onnx"], "--out", tmp_path / "q.onnx", *argv)
    line = _one_line_error(r, "quantize")
    for name in names:
        assert name in line


def test_quantize_missing_model_and_existing_output(run_cli, digits_model, tmp_path):
    line = _one_line_error(run_cli("quantize", "--model", tmp_path / "none.onnx", "--out", tmp_path / "q.onnx",
                                   "--mode", "dynamic"), "quantize")
    assert "none.onnx" in line
    (tmp_path / "q.onnx").write_bytes(b"keep me")
    line = _one_line_error(run_cli("quantize", "--model", digits_model["onnx"], "--out", tmp_path / "q.onnx",
                                   "--mode", "dynamic"), "quantize")
    assert "--force" in line and (tmp_path / "q.onnx").read_bytes() == b"keep me"


def test_inspect_summarises_and_detects_a_changed_file(run_cli, digits_model, tmp_path):
    r = run_cli("inspect", digits_model["onnx"], "--json", tmp_path / "i.json")
    assert r.code == 0
    assert "sha256 matches" in r.out and "Gemm 2" in r.out and "opset       17" in r.out
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["quantized"] is False and info["manifest"]["sha256_match"] is True
    assert info["manifest"]["source"]["weights"]["format"] == "state_dict"
    import onnx

    copy = tmp_path / "digits.onnx"
    changed = onnx.load(str(digits_model["onnx"]))
    changed.doc_string = "edited after export"
    onnx.save(changed, str(copy))
    (tmp_path / "digits.manifest.json").write_bytes((digits_model["dir"] / "digits.manifest.json").read_bytes())
    r = run_cli("inspect", copy)
    assert "DOES NOT MATCH" in r.out
    assert "not found" in _one_line_error(run_cli("inspect", tmp_path / "nope.onnx"), "inspect")


def test_bench_model_json(run_cli, digits_model, tmp_path):
    report = tmp_path / "bench.json"
    r = run_cli("bench-model", digits_model["onnx"], "--batch", "1", "--batch", "8", "--threads", "1",
                "--runs", "50", "--json", report)
    assert r.code == 0, r.err
    rows = json.loads(report.read_text())["results"]
    assert {(row["batch"], row["threads"]) for row in rows} == {(1, 1), (8, 1)}
    assert all(row["runs"] >= 50 and row["p90_ms"] >= row["p50_ms"] > 0 for row in rows)
    assert "p50 ms" in r.out and "{" not in r.out  # the table alone on stdout
    # --json -: stdout is the JSON alone (for jq), the table goes to stderr.
    piped = run_cli("bench-model", digits_model["onnx"], "--threads", "1", "--runs", "50", "--json", "-")
    assert piped.code == 0, piped.err
    assert json.loads(piped.out)["results"][0]["batch"] == 1 and "p50 ms" in piped.err


def test_predict_runs_without_loading_torch(digits_model, tmp_path):
    from fedge.datasets import digits

    x, y = digits(split="test")
    data = tmp_path / "batch.npz"
    np.savez(data, x=x[:40], labels=y[:40])
    preds = tmp_path / "preds.npz"
    script = ("import sys; from export import cli; rc = cli.main(sys.argv[1:]); "
              "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
              "print('TORCH_MODULES', loaded); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, "predict", "--model", str(digits_model["onnx"]),
                           "--input", str(data), "--output", str(preds)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_MODULES []" in proc.stdout
    assert "accuracy against the labels" in proc.stdout
    saved = np.load(preds)
    assert saved["predictions"].shape == (40,) and saved["probabilities"].shape == (40, 10)
    np.testing.assert_allclose(saved["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(saved["predictions"] == y[:40]) > 0.85


def test_cli_entry_point_reports_a_bad_import_path_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "export.cli", "export", "--model", "nosuch.module:factory",
                           "--input", "x:1x4", "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedge export: error: model factory 'nosuch.module:factory': module 'nosuch' not found on PYTHONPATH or in "
        f"the current directory ({tmp_path}); check the spelling, or run from the folder that holds it"]


def test_weights_that_are_plain_text_are_one_line(run_cli, tmp_path):
    text = tmp_path / "weights.txt"
    text.write_text("these are not weights\n")
    line = _one_line_error(run_cli("export", "--model", "fedge.models:digits_mlp", "--input", "x:1x64",
                                   "--weights", text, "--out", tmp_path / "m.onnx"), "export")
    assert "weights.txt" in line and "torch.save(model.state_dict(), path)" in line


def test_npy_files_feed_a_one_input_model(run_cli, digits_model, tmp_path):
    from fedge.datasets import digits

    x, _ = digits(split="train")
    np.save(tmp_path / "calib.npy", x[:128])
    r = run_cli("quantize", "--model", digits_model["onnx"], "--out", tmp_path / "q.onnx", "--calibration",
                tmp_path / "calib.npy", "--no-latency")
    assert r.code == 0, r.err
    r = run_cli("predict", "--model", digits_model["onnx"], "--input", tmp_path / "calib.npy", "--show", "1")
    assert r.code == 0, r.err and "128 rows" in r.out


@pytest.mark.parametrize("arrays, argv, names", [
    ({"x": np.zeros((4, 65), np.float32)}, ["predict"], ["dimension 1 is 65", "expects 64", "batchx64"]),
    ({"x": np.zeros((4, 8, 8), np.float32)}, ["predict"], ["rank 2", "batchx64"]),
    ({"x": np.where(np.arange(4 * 64).reshape(4, 64) == 130, np.nan, 0).astype(np.float32)}, ["predict"],
     ["input 'x' holds 1 NaN or infinite value(s), the first in row 2", "fill or drop those rows"]),
    ({"x": np.full((4, 64), np.inf, np.float32), "labels": np.zeros(4)}, ["quantize", "--mode", "dynamic", "--eval"],
     ["evaluation data", "NaN or infinite"]),
    ({"x": np.zeros((4, 65), np.float32), "labels": np.zeros(4)}, ["quantize", "--mode", "dynamic", "--eval"],
     ["evaluation data", "dimension 1 is 65"]),
    ({"x": np.zeros((4, 65), np.float32)}, ["quantize", "--calibration"], ["calibration data", "dimension 1 is 65"]),
    ({"labels": np.zeros(4)}, ["quantize", "--mode", "dynamic", "--eval"], ["holds labels but no input arrays"]),
    ({"x": np.zeros((4, 64), np.float32), "labels": np.zeros((4, 10))}, ["quantize", "--mode", "dynamic", "--eval"],
     ["one class index per row", "argmax"]),
])
def test_data_that_does_not_fit_the_model_is_one_line(run_cli, digits_model, tmp_path, arrays, argv, names):
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    command = argv[0]
    if command == "predict":
        r = run_cli("predict", "--model", digits_model["onnx"], "--input", data)
    else:
        r = run_cli("quantize", "--model", digits_model["onnx"], "--out", tmp_path / "q.onnx", *argv[1:], data)
    line = _one_line_error(r, command)
    for name in names:
        assert name in line


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    from export.onnx_export import export_from_factory
    from export.signature import parse_input_spec

    folder = tmp_path_factory.mktemp("tokens")
    export_from_factory("tests.export.zoo:token_classifier", [parse_input_spec("tokens:1xlen=8:int64")],
                        folder / "tok.onnx", factory_args={"vocab": 20})
    return folder / "tok.onnx"


def test_token_ids_outside_the_vocabulary_and_float_ids_are_one_line(run_cli, token_model, tmp_path):
    np.savez(tmp_path / "big.npz", tokens=np.array([[1, 2, 25, 3]] * 3))
    line = _one_line_error(run_cli("predict", "--model", token_model, "--input", tmp_path / "big.npz"), "predict")
    assert "idx=25" in line and "vocabulary size" in line and "\x1b" not in line
    np.savez(tmp_path / "float.npz", tokens=np.array([[1.5, 2, 7, 3]] * 3))
    line = _one_line_error(run_cli("predict", "--model", token_model, "--input", tmp_path / "float.npz"), "predict")
    assert "float64" in line and "int64" in line
    # Float calibration data for an integer input would calibrate on truncated garbage: refused too.
    line = _one_line_error(run_cli("quantize", "--model", token_model, "--out", tmp_path / "q.onnx", "--calibration",
                                   tmp_path / "float.npz"), "quantize")
    assert "calibration data" in line and "float64" in line


def test_run_failures_print_no_onnx_runtime_log_lines(token_model, tmp_path):
    np.savez(tmp_path / "big.npz", tokens=np.array([[1, 2, 25, 3]] * 3))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "export.cli", "predict", "--model", str(token_model), "--input",
                           str(tmp_path / "big.npz")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "\x1b" not in proc.stderr
    assert proc.stderr.startswith("fedge predict: error: ONNX Runtime failed to run tok.onnx: Gather node")


def test_inspect_an_empty_file_and_a_negative_accuracy_drop(run_cli, digits_model, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "not an ONNX model" in _one_line_error(run_cli("inspect", tmp_path / "empty.onnx"), "inspect")
    line = _one_line_error(run_cli("quantize", "--model", digits_model["onnx"], "--out", tmp_path / "q.onnx",
                                   "--mode", "dynamic", "--eval", digits_model["eval"], "--max-accuracy-drop", "-1"),
                           "quantize")
    assert "--max-accuracy-drop -1" in line and ">= 0" in line


def test_a_module_in_the_current_directory_is_found_as_python_m_would(tmp_path):
    (tmp_path / "mymodels.py").write_text("import torch\n\ndef tiny():\n    return torch.nn.Linear(4, 2)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "export.cli", "export", "--model", "mymodels:tiny", "--input",
                           "x:1x4", "--out", "tiny.onnx"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tiny.onnx").exists()


def test_non_classifier_outputs_are_compared_by_error_and_snr(tmp_path):
    import torch

    from export.onnx_export import export_model
    from export.quantize import quantize_model
    from export.report import compare_models
    from export.signature import parse_input_spec

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    export_model(model, [parse_input_spec("x:1x16")], tmp_path / "ae.onnx")
    x = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
    quantize_model(tmp_path / "ae.onnx", tmp_path / "ae8.onnx", calibration={"x": x})
    from export.data import Dataset

    cmp = compare_models(tmp_path / "ae.onnx", tmp_path / "ae8.onnx", eval_set=Dataset({"x": x}, None), latency=False)
    table = cmp.table()
    assert cmp.mse is not None and cmp.mse > 0 and cmp.snr_db is not None and 10 < cmp.snr_db < 80
    assert "mean sq. error" in table and "SNR" in table and " dB" in table
